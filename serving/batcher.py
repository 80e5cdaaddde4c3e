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

The objective covers the whole time a request spends in the server: from its enqueue (the
route passes the request's arrival) to its result, queue + feature read + model; a batch's
latency is its slowest request's. A miss multiplies the size by ``backoff`` (0.9: Clipper's
~10%). Except under a backlog: when the batch left requests in the queue and its own processing
took at most half the objective, the miss comes from waiting behind earlier batches, and a
smaller batch would drain the queue slower (less work per feature read and model call) and
never recover; so the size grows instead. Half, because without a backlog a request waits at
most for the batch running when it arrived, then for its own: about two processing times.

The wait for a batch to fill (``max_delay_s``) is taken only after a full batch. A batch that
did not fill says the arrivals do not keep up with the batches: waiting for more would add up
to ``max_delay_s`` to every request and gain nothing (measured with bench.serve at 8 clients,
where the size settles one step above the requests in flight and every batch waited the whole
delay). Batches still form on their own from what arrives while the previous one runs.

One controller per model version (KeyedBatchers): versions differ in cost, and a canary or a
bandit arm must not shrink production's batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger("sluice.serving.batcher")
In = TypeVar("In")
Out = TypeVar("Out")
Key = TypeVar("Key", bound=Hashable)


@dataclass
class AimdController:
    """Batch size control: +increase while latency <= objective, *backoff when above (module
    docstring: latency is the whole request's; the backlog exception)."""

    objective_ms: float
    min_size: int = 1
    max_size: int = 256
    increase: int = 1
    backoff: float = 0.9
    size: int = 1
    history: list[tuple[int, float, int]] = field(default_factory=list)  # (batch, ms, new size)
    keep_history: int = 1000

    def __post_init__(self) -> None:
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError("need 1 <= min_size <= max_size")
        if not 0 < self.backoff < 1:
            raise ValueError("backoff must lie in (0, 1)")
        self.size = min(max(self.size, self.min_size), self.max_size)

    def observe(
        self,
        batch_len: int,
        latency_ms: float,
        process_ms: float | None = None,
        backlog: bool = False,
    ) -> int:
        """Record one batch: its slowest request's time in the server, the batch's own
        processing time and whether requests were left queued; returns the next size."""
        process = latency_ms if process_ms is None else process_ms
        if latency_ms > self.objective_ms and not (backlog and process <= self.objective_ms / 2):
            self.size = max(self.min_size, int(self.size * self.backoff))  # floor: >= 1 less
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
    enqueued: float  # the batcher's clock


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
        on_batch: Callable[[int, float, float], None] | None = None,
        process_async: Callable[[list[In]], Awaitable[Sequence[Out] | None]] | None = None,
    ) -> None:
        """``on_batch(rows, latency_ms, process_ms)``: the slowest request's time in the server
        and the batch's own feature read + predict time. ``process_async``: a batch on the
        event loop instead of ``process`` in the executor; its None means "not this batch"
        (``process`` then runs it in the executor)."""
        self.process = process
        self.process_async = process_async
        self.controller = controller
        self.max_delay_s = max_delay_s
        self._queue: asyncio.Queue[_Pending[In, Out]] = asyncio.Queue(max_queue)
        self._executor = executor
        self._clock = clock
        self._on_batch = on_batch
        self._worker: asyncio.Task[None] | None = None
        self._fill_wait = True  # the last batch was full: the next may wait max_delay_s
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

    async def submit(self, item: In, arrived: float | None = None) -> Out:
        """Queue one request and wait for its result (or the batch's exception). ``arrived``
        (on the batcher's clock, time.perf_counter by default): when the request reached the
        server, so that the objective covers its time before the queue too; default now."""
        return await self.enqueue(item, arrived)

    def enqueue(self, item: In, arrived: float | None = None) -> asyncio.Future[Out]:
        """Queue one request; its future gets the result. Cancelling the future (the caller's
        deadline passed) withdraws the request: a batch leaves cancelled requests out."""
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        enqueued = self._clock() if arrived is None else arrived
        try:
            self._queue.put_nowait(_Pending(item, future, enqueued))
        except asyncio.QueueFull:
            raise QueueFullError(f"{self._queue.maxsize} requests queued") from None
        return future

    async def _next_batch(self) -> list[_Pending[In, Out]]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        # Wait for the batch to fill only after a full one (module docstring).
        deadline = loop.time() + (self.max_delay_s if self._fill_wait else 0.0)
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
        self._fill_wait = len(batch) >= size
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
            backlog = not self._queue.empty()
            items = [pending.item for pending in batch]
            started = self._clock()
            try:
                results = None
                if self.process_async is not None:
                    results = await self.process_async(items)
                if results is None:
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
                done = self._clock()
                process_ms = (done - started) * 1000
                latency_ms = (done - min(pending.enqueued for pending in batch)) * 1000
                self.controller.observe(len(batch), latency_ms, process_ms, backlog)
                self.batches += 1
                for _ in batch:
                    self._queue.task_done()
                if self._on_batch is not None:
                    try:
                        self._on_batch(len(batch), latency_ms, process_ms)
                    except Exception:
                        log.exception("on_batch callback failed")


class KeyedBatchers(Generic[Key, In, Out]):
    """One batcher (queue, worker, AIMD controller) per key, e.g. per model version, made on
    first use. ``retain`` stops the batchers of keys no longer served, after their queues
    drained; a request that still names a retired key gets a fresh batcher, retired in turn at
    the next ``retain``."""

    def __init__(self, make: Callable[[Key], AdaptiveBatcher[In, Out]]) -> None:
        self._make = make
        self.batchers: dict[Key, AdaptiveBatcher[In, Out]] = {}
        self._stopping: set[asyncio.Task[None]] = set()

    def get(self, key: Key) -> AdaptiveBatcher[In, Out]:
        batcher = self.batchers.get(key)
        if batcher is None:
            batcher = self.batchers[key] = self._make(key)
            batcher.start()
        return batcher

    @property
    def queued(self) -> int:
        return sum(b.queued for b in self.batchers.values())

    def retain(self, keys: Iterable[Key]) -> None:
        keep = set(keys)
        for key in [k for k in self.batchers if k not in keep]:
            task = asyncio.get_running_loop().create_task(self.batchers.pop(key).stop())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def stop(self) -> None:
        batchers, self.batchers = list(self.batchers.values()), {}
        await asyncio.gather(*(b.stop() for b in batchers), *self._stopping)
