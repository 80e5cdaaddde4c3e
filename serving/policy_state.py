"""Selection-policy state shared by every predictor replica: numbers in Redis hashes, cached.

One hash per (model name, policy kind, context value): ``sluice:policy:<model>:<kind>:<ctx>``,
fields such as ``lw:3`` (Exp3/Exp4 log-weight of version 3) or ``n:3`` / ``loss:3``
(epsilon-greedy counts). Keeping the kind in the key means switching the policy of a model
starts from fresh state instead of misreading another policy's numbers. The state lives in
Redis, so it is shared by all replicas and survives their restarts.

Writers (the feedback consumer) send one ``apply``: fields to create if absent (HSETNX: a new
arm enters at the mean weight, and a concurrent writer's value is never overwritten) and
increments (HINCRBYFLOAT), in one MULTI/EXEC transaction, so concurrent consumers never lose
an update. Readers (the request path) never wait on Redis for known keys: ``CachedPolicyState``
serves the last copy and a background thread re-reads every known key in one pipeline every
``refresh_s``. A key seen for the first time (a new context value) is read synchronously once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

log = logging.getLogger("sluice.serving.policy_state")
KEY_PREFIX = "sluice:policy"
MAX_KEYS = 10_000  # context values cached; beyond, new values share the global state


def state_key(model: str, kind: str, context: str = "") -> str:
    return f"{KEY_PREFIX}:{model}:{kind}:{context}"


class PolicyStore(Protocol):
    def read_many(self, keys: Sequence[str]) -> list[dict[str, float]]: ...

    def apply(self, key: str, init: Mapping[str, float], add: Mapping[str, float]) -> None: ...


class MemoryPolicyStore:
    """The store in one process (unit tests; a single replica without Redis)."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()
        self.reads = 0

    def read_many(self, keys: Sequence[str]) -> list[dict[str, float]]:
        with self._lock:
            self.reads += 1
            return [dict(self.hashes.get(key, {})) for key in keys]

    def apply(self, key: str, init: Mapping[str, float], add: Mapping[str, float]) -> None:
        with self._lock:
            fields = self.hashes.setdefault(key, {})
            for name, value in init.items():
                fields.setdefault(name, value)
            for name, value in add.items():
                fields[name] = fields.get(name, 0.0) + value


class RedisPolicyStore:
    def __init__(self, client: Any) -> None:
        self._redis = client

    @classmethod
    def from_url(cls, url: str) -> RedisPolicyStore:
        import redis

        return cls(redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0))

    def read_many(self, keys: Sequence[str]) -> list[dict[str, float]]:
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        return [{k.decode(): float(v) for k, v in raw.items()} for raw in pipe.execute()]

    def apply(self, key: str, init: Mapping[str, float], add: Mapping[str, float]) -> None:
        pipe = self._redis.pipeline(transaction=True)
        for name, value in init.items():
            pipe.hsetnx(key, name, repr(float(value)))
        for name, value in add.items():
            pipe.hincrbyfloat(key, name, float(value))
        pipe.execute()

    def close(self) -> None:
        self._redis.close()


class CachedPolicyState:
    """Reads for the request path: the last copy of each key, refreshed in the background."""

    def __init__(self, store: PolicyStore, refresh_s: float = 0.2) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self._cache: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refreshes = 0
        self.errors = 0

    def get(self, key: str) -> Mapping[str, float]:
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if len(self._cache) >= MAX_KEYS:
            return {}
        try:
            (fields,) = self.store.read_many([key])
        except Exception as exc:  # Redis down: serve as if fresh; the refresher retries
            self.errors += 1
            log.warning("policy state unreadable", extra={"key": key, "error": str(exc)})
            fields = {}
        with self._lock:
            self._cache[key] = fields
        return fields

    def refresh(self, keys: Sequence[str] | None = None) -> None:
        """Re-read keys (default: all known) and replace their cached copies."""
        wanted = list(self._cache) if keys is None else list(keys)
        if not wanted:
            return
        values = self.store.read_many(wanted)
        with self._lock:
            for key, fields in zip(wanted, values, strict=True):
                self._cache[key] = fields
        self.refreshes += 1

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="sluice-policy-state", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception as exc:  # keep serving the last copy; try again next period
                self.errors += 1
                log.warning("policy state refresh failed", extra={"error": str(exc)})

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        close = getattr(self.store, "close", None)
        if close is not None:
            close()
