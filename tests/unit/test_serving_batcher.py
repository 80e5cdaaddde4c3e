"""AIMD batch sizing: additive increase under the objective, multiplicative decrease above it."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.batcher import AdaptiveBatcher, AimdController, KeyedBatchers, QueueFullError


def test_controller_moves_up_additively_and_down_by_a_tenth():
    aimd = AimdController(objective_ms=20, max_size=64, increase=2)
    assert aimd.backoff == 0.9  # Clipper's ~10%
    sizes = [aimd.observe(aimd.size, latency) for latency in [5, 5, 5, 5, 30, 5, 25, 25, 25, 25]]
    assert sizes == [3, 5, 7, 9, 8, 10, 9, 8, 7, 6]
    for _ in range(100):
        aimd.observe(aimd.size, 1.0)
    assert aimd.size == 64  # bounded above
    # A partial batch says nothing about larger ones: no growth, but a slow one still shrinks.
    assert aimd.observe(3, 1.0) == 64
    assert aimd.observe(3, 50.0) == 57
    for _ in range(100):
        aimd.observe(aimd.size, 50.0)
    assert aimd.size == 1  # bounded below


def test_a_miss_from_queueing_behind_a_backlog_grows_the_batch():
    aimd = AimdController(objective_ms=20, size=10, max_size=64, increase=2)
    # Requests waited (whole 30 ms > 20), the batch itself took 8 ms <= 10 and left requests
    # queued: a smaller batch would drain slower, so grow.
    assert aimd.observe(10, 30.0, process_ms=8.0, backlog=True) == 12
    # The batch alone took more than half the objective: shrink even with a backlog.
    assert aimd.observe(12, 30.0, process_ms=15.0, backlog=True) == 10
    # No backlog: a miss is a miss.
    assert aimd.observe(10, 30.0, process_ms=8.0, backlog=False) == 9


def test_controller_rejects_nonsense_bounds():
    with pytest.raises(ValueError, match="min_size"):
        AimdController(objective_ms=20, min_size=5, max_size=2)
    with pytest.raises(ValueError, match="backoff"):
        AimdController(objective_ms=20, backoff=1.5)


class FakeClock:
    """Time advances only when a batch 'runs': cost per batch = fixed + per-row."""

    def __init__(self) -> None:
        self.now = 0.0
        self.fixed_ms = 2.0
        self.per_row_ms = 1.0

    def __call__(self) -> float:
        return self.now

    def run(self, batch: list[int]) -> list[int]:
        self.now += (self.fixed_ms + self.per_row_ms * len(batch)) / 1000
        return [x * 10 for x in batch]


async def _drive(batcher: AdaptiveBatcher[int, int], n: int) -> list[int]:
    # All requests are queued before the worker takes its first batch: every batch is full.
    tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(n)]
    await asyncio.sleep(0)
    batcher.start()
    results = await asyncio.gather(*tasks)
    await batcher.stop()
    return list(results)


async def _waves(batcher: AdaptiveBatcher[int, int], aimd: AimdController, n: int) -> None:
    """Requests arrive a batch at a time (each wave as large as the size): no queueing."""
    batcher.start()
    for _ in range(n):
        size = aimd.size
        got = await asyncio.gather(*(batcher.submit(i) for i in range(size)))
        assert got == [i * 10 for i in range(size)]
    await batcher.stop()


def test_batcher_grows_batches_while_fast_and_shrinks_when_latency_rises():
    clock = FakeClock()
    aimd = AimdController(objective_ms=20, max_size=100, increase=1)
    with ThreadPoolExecutor(1) as executor:
        batcher = AdaptiveBatcher(clock.run, aimd, executor=executor, clock=clock)

        async def scenario() -> None:
            await _waves(batcher, aimd, 40)
            sizes = [size for _, _, size in aimd.history]
            # 2 ms + 1 ms/row: batches grow by one until a batch of 19 rows costs 21 ms.
            assert sizes[:5] == [2, 3, 4, 5, 6]
            assert max(sizes) == 19
            assert 17 in sizes[sizes.index(19) :]  # 19 rows took 21 ms > 20: 19 * 0.9 -> 17
            # Now every row costs 4 ms: the size falls by a tenth per miss to what fits.
            clock.per_row_ms = 4.0
            aimd.history.clear()
            previous = aimd.size
            await _waves(batcher, aimd, 40)
            sizes = [size for _, _, size in aimd.history]
            assert max(sizes[-10:]) <= 5  # 5 rows = 22 ms, 4 rows = 18 ms
            for rows, latency, size in aimd.history:
                if latency > 20:
                    assert size == max(1, int(previous * 0.9))
                elif rows >= previous:
                    assert size == previous + 1
                previous = size

        asyncio.run(scenario())


def test_the_objective_covers_the_time_before_the_batch():
    """A request's time in the server counts from its arrival: 15 ms spent before the queue
    leave 5 ms for the batch (2 ms + 1 ms/row: 3 rows)."""
    clock = FakeClock()
    aimd = AimdController(objective_ms=20, max_size=100, increase=1)
    with ThreadPoolExecutor(1) as executor:
        batcher = AdaptiveBatcher(clock.run, aimd, executor=executor, clock=clock)

        async def scenario() -> None:
            batcher.start()
            for _ in range(40):
                arrived = clock() - 0.015
                await asyncio.gather(*(batcher.submit(i, arrived) for i in range(aimd.size)))
            await batcher.stop()

        asyncio.run(scenario())
    assert [size for _, _, size in aimd.history][-10:] in ([3, 4] * 5, [4, 3] * 5)
    for _, latency, _ in aimd.history:
        assert latency >= 15  # the time before the queue is part of every batch's latency


def test_under_a_backlog_the_size_settles_where_a_batch_takes_half_the_objective():
    clock = FakeClock()
    aimd = AimdController(objective_ms=20, max_size=100, increase=1)
    with ThreadPoolExecutor(1) as executor:
        batcher = AdaptiveBatcher(clock.run, aimd, executor=executor, clock=clock)
        # 300 requests queued at once: all but the first batches miss by queueing alone.
        assert asyncio.run(_drive(batcher, 300)) == [i * 10 for i in range(300)]
    sizes = [size for _, _, size in aimd.history]
    assert sizes[:5] == [2, 3, 4, 5, 6]  # grows through the backlog instead of collapsing
    assert set(sizes[10:-3]) <= {7, 8, 9}  # 2 + 8 rows = 10 ms: half the objective


def test_keyed_batchers_keep_one_controller_per_version_and_retire_old_ones():
    """A slow version's misses shrink its own batches, never another version's."""
    costs = {1: 1.0, 2: 30.0}  # ms per row
    clock = FakeClock()
    controllers: dict[int, AimdController] = {}

    def make(version: int) -> AdaptiveBatcher[int, int]:
        def run(batch: list[int]) -> list[int]:
            clock.now += costs[version] * len(batch) / 1000
            return batch

        controllers[version] = AimdController(objective_ms=20, size=8, max_size=100)
        return AdaptiveBatcher(run, controllers[version], clock=clock)

    keyed: KeyedBatchers[int, int, int] = KeyedBatchers(make)

    async def scenario() -> None:
        for _ in range(10):
            for version in (1, 2):
                size = controllers[version].size if version in controllers else 8
                await asyncio.gather(*(keyed.get(version).submit(i) for i in range(size)))
        assert controllers[1].size > 8  # 1 ms/row: grew
        assert controllers[2].size == 1  # 30 ms/row: shrank to one row
        retired = keyed.batchers[2]
        keyed.retain([1])
        assert set(keyed.batchers) == {1}
        await asyncio.sleep(0.01)
        assert retired._worker is None  # stopped once its queue drained
        assert await keyed.get(2).submit(5) == 5  # a late request gets a fresh batcher
        await keyed.stop()
        assert keyed.batchers == {}

    asyncio.run(scenario())


def test_max_delay_fills_a_batch_and_errors_reach_every_caller():
    calls: list[list[int]] = []

    def process(batch: list[int]) -> list[int]:
        calls.append(batch)
        if 13 in batch:
            raise ValueError("bad row 13")
        return batch

    aimd = AimdController(objective_ms=1000, size=8, max_size=8)
    batcher = AdaptiveBatcher(process, aimd, max_delay_s=0.05)

    async def scenario() -> None:
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.01)  # within the delay: joins the first one's batch
        second = asyncio.ensure_future(batcher.submit(2))
        assert list(await asyncio.gather(first, second)) == [1, 2]
        assert calls == [[1, 2]]
        bad = await asyncio.gather(batcher.submit(13), batcher.submit(14), return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in bad)
        assert await batcher.submit(15) == 15  # the worker survived
        await batcher.stop()

    asyncio.run(scenario())


def test_a_full_queue_refuses_at_once():
    batcher: AdaptiveBatcher[int, int] = AdaptiveBatcher(
        lambda b: b, AimdController(objective_ms=10), max_queue=2
    )

    async def scenario() -> None:
        pending = [asyncio.ensure_future(batcher.submit(i)) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await batcher.submit(3)
        batcher.start()
        assert await asyncio.gather(*pending) == [0, 1]
        await batcher.stop()

    asyncio.run(scenario())


def test_the_fill_wait_follows_only_a_full_batch():
    """After a batch that did not fill, the next one takes what is queued at once: waiting
    max_delay_s again would only add latency (serving/batcher.py)."""
    calls: list[list[int]] = []

    def process(batch: list[int]) -> list[int]:
        calls.append(batch)
        return batch

    batcher = AdaptiveBatcher(process, AimdController(objective_ms=1000, size=4), max_delay_s=0.3)

    async def scenario() -> None:
        batcher.start()
        started = time.perf_counter()
        assert await batcher.submit(1) == 1  # the first batch may wait: it does, in vain
        waited = time.perf_counter() - started
        started = time.perf_counter()
        assert await batcher.submit(2) == 2
        again = time.perf_counter() - started
        full = await asyncio.gather(*(batcher.submit(i) for i in range(10, 14)))  # fills 4
        assert list(full) == [10, 11, 12, 13]
        started = time.perf_counter()
        assert await batcher.submit(3) == 3  # after a full batch: waits again
        after_full = time.perf_counter() - started
        await batcher.stop()
        assert waited >= 0.25
        assert after_full >= 0.25
        assert again < 0.25
        assert calls == [[1], [2], [10, 11, 12, 13], [3]]

    asyncio.run(scenario())
