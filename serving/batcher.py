"""Adaptive batching as in Clipper (Crankshaw et al., NSDI 2017): one queue per model, AIMD.

A worker takes up to ``size`` queued requests (waiting at most ``max_delay_s`` for the batch to
fill), runs the batch in a thread (feature read and predict release the GIL; the event loop
keeps accepting requests meanwhile) and measures how long it took. The controller then moves
the size: additive increase while batches finish within the latency objective, multiplicative
decrease when one does not. Larger batches amortize the Redis round trip and LightGBM's per-call
cost; the objective keeps them from growing past what the latency budget allows.

One refinement over plain AIMD: the size only grows after a *full* batch. A batch smaller than
the size says nothing about whether a larger one would meet the objective, and growing on it
would let a quiet period push the size to its maximum, then blow the objective on the first
burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger("sluice.serving.batcher")
In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class AimdController:
    """Batch size control: +increase while latency <= objective, *backoff when above."""

    objective_ms: float
    min_size: int = 1
    max_size: int = 256
    increase: int = 1
    backoff: float = 0.5
    size: int = 1
    history: list[tuple[int, float, int]] = field(default_factory=list)  # (batch, ms, new size)
    keep_history: int = 1000

    def __post_init__(self) -> None:
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError("need 1 <= min_size <= max_size")
        if not 0 < self.backoff < 1:
            raise ValueError("backoff must lie in (0, 1)")
        self.size = min(max(self.size, self.min_size), self.max_size)

    def observe(self, batch_len: int, latency_ms: float) -> int:
        """Record one batch's latency; returns the size for the next batch."""
        if latency_ms > self.objective_ms:
            self.size = max(self.min_size, int(self.size * self.backoff))
        elif batch_len >= self.size:
            self.size = min(self.max_size, self.size + self.increase)
        self.history.append((batch_len, latency_ms, self.size))
        if len(self.history) > self.keep_history:
            del self.history[: len(self.history) - self.keep_history]
        return self.size


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]


class QueueFullError(Exception):
    """The batcher's queue holds max_queue requests already."""


class AdaptiveBatcher(Generic[In, Out]):
    """Queue, batch and run ``process`` (a blocking function of a list) for one model."""

    def __init__(
        self,
        process: Callable[[list[In]], Sequence[Out]],
        controller: AimdController,
        *,
        max_delay_s: float = 0.0,
        max_queue: int = 10_000,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.perf_counter,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.process = process
        self.controller = controller
        self.max_delay_s = max_delay_s
        self._queue: asyncio.Queue[_Pending[In, Out]] = asyncio.Queue(max_queue)
        self._executor = executor
        self._clock = clock
        self._on_batch = on_batch
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0
        self.withdrawn = 0  # requests cancelled before their batch ran

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Finish what is queued, then stop the worker."""
        if self._worker is None:
            return
        await self._queue.join()
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._worker = None

    async def submit(self, item: In) -> Out:
        """Queue one request and wait for its result (or the batch's exception)."""
        return await self.enqueue(item)

    def enqueue(self, item: In) -> asyncio.Future[Out]:
        """Queue one request; its future gets the result. Cancelling the future (the caller's
        deadline passed) withdraws the request: a batch leaves cancelled requests out."""
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(item, future))
        except asyncio.QueueFull:
            raise QueueFullError(f"{self._queue.maxsize} requests queued") from None
        return future

    async def _next_batch(self) -> list[_Pending[In, Out]]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay_s
        size = self.controller.size
        while len(batch) < size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            taken = await self._next_batch()
            # Requests whose callers gave up (deadline) are not worth a feature read.
            batch = [pending for pending in taken if not pending.future.done()]
            for _ in range(len(taken) - len(batch)):
                self._queue.task_done()
            self.withdrawn += len(taken) - len(batch)
            if not batch:
                continue
            items = [pending.item for pending in batch]
            started = self._clock()
            try:
                results = await loop.run_in_executor(self._executor, self.process, items)
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
            except Exception as exc:  # the batch's callers get the error, the worker lives on
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
            else:
                for pending, result in zip(batch, results, strict=True):
                    if not pending.future.done():  # the caller may have gone away
                        pending.future.set_result(result)
            finally:
                latency_ms = (self._clock() - started) * 1000
                self.controller.observe(len(batch), latency_ms)
                self.batches += 1
                for _ in batch:
                    self._queue.task_done()
                if self._on_batch is not None:
                    try:
                        self._on_batch(len(batch), latency_ms)
                    except Exception:
                        log.exception("on_batch callback failed")
