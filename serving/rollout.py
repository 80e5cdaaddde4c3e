"""Rollout across replicas: promote, rollback, canary and shadow, and the admin routes for them.

The registry holds the truth (production pointer, models/rollout.py's RolloutState). A change
made through any replica's admin route is written there, then announced on Redis pub/sub
(channel ``sluice.rollout.<model>``, the message is only a nudge); every replica subscribed
re-reads the registry and swaps its ModelSlot state in one assignment (serving/selection.py).
Each replica also re-reads the registry every ``rollout_poll_s``, so a missed notice, a Redis
outage or a change made without a server (``sluice retrain`` promoting) is applied within that
time. Models already loaded are reused; a new version is loaded completely before the swap.

Requests: a canary answers its share of requests (the answer's model_version says which
version answered); otherwise the selection policy chooses among production arms. Shadow
versions predict on a copy of every answered row, in their own batches, after the answer; their
predictions go to the prediction topic with ``shadow_of`` (the answer's prediction_id) and are
never returned. A full shadow queue drops the copy (counted), never delaying answers.

Concurrent admin changes of one model through different replicas: last writer wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from core.errors import SluiceError
from models.registry import ModelRegistry
from models.rollout import RolloutState
from serving.auth import Scope, require
from serving.batcher import QueueFullError
from serving.model import LoadedModel, Prediction, PredictItem
from serving.schemas import ErrorBody, InvalidRequestBody, PromoteResponse
from serving.selection import ModelSlot, SlotState

log = logging.getLogger("sluice.serving.rollout")
CHANNEL_PREFIX = "sluice.rollout."


class RolloutBus(Protocol):
    """Change notices between replicas: publish a model's name, wait for the next one."""

    async def publish(self, name: str) -> None: ...

    async def next_change(self, timeout_s: float) -> str | None: ...

    async def close(self) -> None: ...


class LocalBus:
    """Notices within one process: a single replica (rollout_bus "local"), and unit tests. The
    registry poll still picks up what other processes change."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[str] | None = None  # made on the running loop

    def _changes(self) -> asyncio.Queue[str]:
        if self._queue is None:
            self._queue = asyncio.Queue()
        return self._queue

    async def publish(self, name: str) -> None:
        self._changes().put_nowait(name)

    async def next_change(self, timeout_s: float) -> str | None:
        try:
            return await asyncio.wait_for(self._changes().get(), timeout_s)
        except TimeoutError:
            return None

    async def close(self) -> None:
        self._queue = None


class RedisBus:
    """Redis pub/sub. Failures are logged and never raised: polling repairs what is missed."""

    def __init__(self, url: str, names: Sequence[str]) -> None:
        import redis.asyncio as aioredis

        self._client = aioredis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=2.0)
        self._channels = [CHANNEL_PREFIX + name for name in names]
        self._pubsub: Any = None
        self._down = False

    def _failed(self, what: str, exc: Exception) -> None:
        if not self._down:  # one line per outage, not one per poll
            log.warning("rollout notices unavailable", extra={"op": what, "error": str(exc)})
        self._down = True

    async def publish(self, name: str) -> None:
        from redis.exceptions import RedisError

        try:
            await self._client.publish(CHANNEL_PREFIX + name, b"changed")
            self._down = False
        except (RedisError, OSError) as exc:
            self._failed("publish", exc)

    async def next_change(self, timeout_s: float) -> str | None:
        from redis.exceptions import RedisError

        try:
            if self._pubsub is None:
                pubsub = self._client.pubsub()
                await pubsub.subscribe(*self._channels)
                self._pubsub = pubsub
            message = await self._pubsub.get_message(
                ignore_subscribe_messages=True, timeout=timeout_s
            )
            self._down = False
        except (RedisError, OSError) as exc:
            self._failed("subscribe", exc)
            await self._drop_pubsub()
            await asyncio.sleep(timeout_s)
            return None
        if message is None:
            return None
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else str(channel)
        return channel.removeprefix(CHANNEL_PREFIX)

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def close(self) -> None:
        await self._drop_pubsub()
        with contextlib.suppress(Exception):
            await self._client.aclose()


@dataclass(frozen=True)
class Target:
    """What one model's slot serves, by version numbers: compared to decide on a swap."""

    production: int
    arms: tuple[int, ...]  # besides production
    canary: tuple[int, float] | None
    shadows: tuple[int, ...]

    @staticmethod
    def of(state: SlotState) -> Target:
        production = state.production.version
        return Target(
            production,
            tuple(sorted(v for v in state.arms if v != production)),
            None if state.canary is None else (state.canary.version, state.canary_share),
            tuple(sorted(m.version for m in state.shadows)),
        )

    def versions(self) -> set[int]:
        canary = [self.canary[0]] if self.canary else []
        return {self.production, *self.arms, *canary, *self.shadows}


class Rollouts:
    """Keeps each served slot equal to the registry's rollout state; makes admin changes."""

    def __init__(
        self,
        registry: ModelRegistry,
        slots: Mapping[str, ModelSlot],
        load: Callable[[str, int], LoadedModel],
        arm_versions: Callable[[str, int], list[int]],
        bus: RolloutBus,
        poll_s: float,
        on_applied: Callable[[str, Target, Target], None],
    ) -> None:
        self.registry = registry
        self.slots = slots
        self.load = load
        self.arm_versions = arm_versions
        self.bus = bus
        self.poll_s = poll_s
        self.on_applied = on_applied  # (name, before, after), after each swap
        self._locks = {name: asyncio.Lock() for name in slots}
        self._watcher: asyncio.Task[None] | None = None
        self.applied = 0

    def target(self, name: str) -> Target | None:
        """The registry's wanted state for a model (blocking); None without production."""
        production = self.registry.production(name)
        if production is None:
            return None
        state = self.registry.rollout(name)
        canary = state.canary
        return Target(
            production,
            tuple(sorted(v for v in self.arm_versions(name, production) if v != production)),
            None
            if canary is None or canary.version == production
            else (canary.version, canary.share),
            tuple(sorted(v for v in state.shadows if v != production)),
        )

    def _models(self, name: str, target: Target, have: Mapping[int, LoadedModel]) -> SlotState:
        loaded = {v: have[v] if v in have else self.load(name, v) for v in target.versions()}
        canary = loaded[target.canary[0]] if target.canary else None
        return SlotState(
            loaded[target.production],
            {v: loaded[v] for v in (target.production, *target.arms)},
            canary,
            target.canary[1] if target.canary else 0.0,
            tuple(loaded[v] for v in target.shadows),
        )

    async def refresh(self, name: str) -> bool:
        """Apply the registry's state to the slot of ``name``; True when it changed."""
        slot = self.slots.get(name)
        if slot is None:
            return False
        async with self._locks[name]:
            target = await asyncio.to_thread(self.target, name)
            before = Target.of(slot.state)
            if target is None or target == before:
                return False
            state = await asyncio.to_thread(self._models, name, target, slot.models())
            self._swap(name, state, before, target)
        return True

    def _swap(self, name: str, state: SlotState, before: Target, after: Target) -> None:
        self.slots[name].swap(
            state.production,
            state.arms,
            canary=state.canary,
            canary_share=state.canary_share,
            shadows=state.shadows,
        )
        self.applied += 1
        self.on_applied(name, before, after)
        log.info("rollout applied", extra={"model": name, "before": before, "after": after})

    async def _refresh_quietly(self, names: Sequence[str]) -> None:
        for name in names:
            try:
                await self.refresh(name)
            except (SluiceError, OSError) as exc:  # keep serving what we have
                log.warning("rollout refresh failed", extra={"model": name, "error": str(exc)})

    def catch_up(self) -> None:
        """Apply the registry's state to every slot now, blocking: at startup, before the
        first request, so that a replica (re)started during a canary or shadow serves it from
        its first answer rather than from its first poll. A failure keeps what was built."""
        for name, slot in self.slots.items():
            try:
                target = self.target(name)
                before = Target.of(slot.state)
                if target is None or target == before:
                    continue
                state = self._models(name, target, slot.models())
            except (SluiceError, OSError) as exc:
                log.warning("rollout catch-up failed", extra={"model": name, "error": str(exc)})
                continue
            self._swap(name, state, before, target)

    async def _watch(self) -> None:
        names = list(self.slots)
        # Subscribe, then read the registry once more: a change made between catch_up and the
        # subscription would otherwise wait for the poll.
        await self.bus.next_change(0.0)
        await self._refresh_quietly(names)
        while True:
            changed = await self.bus.next_change(self.poll_s)
            # A notice: that model now. No notice within poll_s: every model (the fallback).
            await self._refresh_quietly(
                [changed] if changed is not None and changed in self.slots else names
            )

    def start(self) -> None:
        """Catch up with the registry (blocking: called once, before requests are taken), then
        watch for changes."""
        if self._watcher is None and self.slots:
            self.catch_up()
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await self.bus.close()

    async def _changed(self, name: str) -> bool:
        await self.bus.publish(name)
        await self.refresh(name)
        return name in self.slots

    async def promote(self, name: str, version: int) -> tuple[int | None, bool]:
        """(previous production, served here). The version is loaded before anything changes:
        a model that cannot serve is refused with the registry untouched."""
        await asyncio.to_thread(self.load, name, version)
        previous = await asyncio.to_thread(self.registry.promote, name, version)
        return previous, await self._changed(name)

    async def rollback(self, name: str) -> tuple[int, int, bool]:
        """(from, to, served here)."""
        current, target = await asyncio.to_thread(self.registry.rollback, name)
        return current, target, await self._changed(name)

    async def canary(self, name: str, version: int, share: float) -> tuple[RolloutState, bool]:
        if share > 0:
            await asyncio.to_thread(self.load, name, version)

        def change() -> RolloutState:
            state = self.registry.rollout(name).with_canary(
                version, share, self.registry.production(name)
            )
            self.registry.set_rollout(name, state)
            return state

        state = await asyncio.to_thread(change)
        return state, await self._changed(name)

    async def shadow(self, name: str, version: int, enabled: bool) -> tuple[RolloutState, bool]:
        if enabled:
            await asyncio.to_thread(self.load, name, version)

        def change() -> RolloutState:
            state = self.registry.rollout(name).with_shadow(
                version, enabled, self.registry.production(name)
            )
            self.registry.set_rollout(name, state)
            return state

        state = await asyncio.to_thread(change)
        return state, await self._changed(name)


class ShadowRunner:
    """Mirrors answered rows to shadow versions in the background and logs their predictions.
    ``on_outcome(model, version, outcome)``: logged, dropped (queue full) or failed."""

    def __init__(
        self,
        submit: Callable[[PredictItem], Awaitable[Prediction]],
        record: Callable[[Prediction, Mapping[str, Any], str], None],
        on_outcome: Callable[[str, int, str], None],
    ) -> None:
        self._submit = submit
        self._record = record
        self._on_outcome = on_outcome
        self._tasks: set[asyncio.Task[None]] = set()

    def mirror(
        self,
        shadows: Sequence[LoadedModel],
        rows: Sequence[tuple[Mapping[str, Any], int | None]],
        answers: Sequence[Prediction],
    ) -> None:
        loop = asyncio.get_running_loop()
        for model in shadows:
            task = loop.create_task(self._run(model, rows, answers))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(
        self,
        model: LoadedModel,
        rows: Sequence[tuple[Mapping[str, Any], int | None]],
        answers: Sequence[Prediction],
    ) -> None:
        results = await asyncio.gather(
            *(self._submit(PredictItem(model, row, t)) for row, t in rows),
            return_exceptions=True,
        )
        for (row, _), answer, result in zip(rows, answers, results, strict=True):
            if isinstance(result, Prediction):
                self._record(result, row, answer.prediction_id)
                outcome = "logged"
            elif isinstance(result, QueueFullError):
                outcome = "dropped"
            else:
                log.warning(
                    "shadow prediction failed",
                    extra={"model": model.name, "version": model.version, "error": str(result)},
                )
                outcome = "failed"
            self._on_outcome(model.name, model.version, outcome)

    async def drain(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)


# Admin routes (one router, so that access control is added in one place).


class CanaryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    share: float = Field(ge=0, le=1, description="Share of requests the version answers; 0 ends")


class ShadowRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="false: the version stops shadowing")


class CanaryState(BaseModel):
    version: int
    share: float


class RolloutResponse(BaseModel):
    model: str
    production: int | None
    canary: CanaryState | None
    shadows: list[int]
    served: bool  # applied on the replica that answered (the others follow within a second)


class RollbackResponse(BaseModel):
    model: str
    version: int
    previous_version: int
    served: bool


def _rollouts(request: Request) -> Rollouts:
    rollouts: Rollouts = request.app.state.predictor.rollouts
    return rollouts


def _state_response(
    name: str, state: RolloutState, production: int | None, served: bool
) -> RolloutResponse:
    canary = state.canary
    return RolloutResponse(
        model=name,
        production=production,
        canary=None if canary is None else CanaryState(version=canary.version, share=canary.share),
        shadows=list(state.shadows),
        served=served,
    )


# Every rollout route manages models: the admin scope (serving/auth.py), and these answers.
_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "no such model or version"},
    409: {
        "model": ErrorBody,
        "description": "the version reads features its feature service no longer provides, "
        "or there is nothing to roll back to",
    },
    422: {"model": InvalidRequestBody, "description": "invalid version or body"},
}


def rollout_router() -> APIRouter:
    router = APIRouter(tags=["rollout"], dependencies=[require(Scope.ADMIN)], responses=_RESPONSES)

    @router.post("/models/{name}/versions/{version}:promote", response_model=PromoteResponse)
    async def promote(name: str, version: int, request: Request) -> PromoteResponse:
        """Make a version production on every replica; requests are never dropped.

        The new version is loaded completely first; queued and running batches finish with the
        model they were given, new requests get the new one. The version's canary or shadow
        ends."""
        previous, served = await _rollouts(request).promote(name, version)
        log.info("promoted", extra={"model": name, "version": version, "previous": previous})
        return PromoteResponse(
            model=name, version=version, previous_version=previous, served=served
        )

    @router.post("/models/{name}:rollback", response_model=RollbackResponse)
    async def rollback(name: str, request: Request) -> RollbackResponse:
        """Production back to the version the current one replaced, on every replica; every
        canary and shadow of the model ends."""
        current, target, served = await _rollouts(request).rollback(name)
        log.info("rolled back", extra={"model": name, "version": target, "previous": current})
        return RollbackResponse(model=name, version=target, previous_version=current, served=served)

    @router.post("/models/{name}/versions/{version}:canary", response_model=RolloutResponse)
    async def canary(
        name: str, version: int, body: CanaryRequest, request: Request
    ) -> RolloutResponse:
        """The version answers ``share`` of the requests on every replica (0 ends the canary;
        a new canary replaces the old one)."""
        rollouts = _rollouts(request)
        state, served = await rollouts.canary(name, version, body.share)
        production = await asyncio.to_thread(rollouts.registry.production, name)
        return _state_response(name, state, production, served)

    @router.post("/models/{name}/versions/{version}:shadow", response_model=RolloutResponse)
    async def shadow(
        name: str, version: int, request: Request, body: ShadowRequest | None = None
    ) -> RolloutResponse:
        """The version predicts on a copy of every request on every replica, logged with
        shadow_of, never answered (``{"enabled": false}`` ends it)."""
        rollouts = _rollouts(request)
        enabled = True if body is None else body.enabled
        state, served = await rollouts.shadow(name, version, enabled)
        production = await asyncio.to_thread(rollouts.registry.production, name)
        return _state_response(name, state, production, served)

    return router
