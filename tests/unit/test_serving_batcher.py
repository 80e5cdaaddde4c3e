"""AIMD batch sizing: additive increase under the objective, multiplicative decrease above it."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.batcher import AdaptiveBatcher, AimdController, QueueFullError


def test_controller_moves_up_additively_and_down_multiplicatively():
    aimd = AimdController(objective_ms=20, max_size=64, increase=2)
    sizes = [aimd.observe(aimd.size, latency) for latency in [5, 5, 5, 5, 30, 5, 25, 25, 25, 25]]
    assert sizes == [3, 5, 7, 9, 4, 6, 3, 1, 1, 1]
    for _ in range(100):
        aimd.observe(aimd.size, 1.0)
    assert aimd.size == 64  # bounded above
    # A partial batch says nothing about larger ones: no growth, but a slow one still shrinks.
    assert aimd.observe(3, 1.0) == 64
    assert aimd.observe(3, 50.0) == 32


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


def test_batcher_grows_batches_while_fast_and_shrinks_when_latency_rises():
    clock = FakeClock()
    aimd = AimdController(objective_ms=20, max_size=100, increase=1)
    with ThreadPoolExecutor(1) as executor:
        batcher = AdaptiveBatcher(clock.run, aimd, executor=executor, clock=clock)

        async def scenario() -> None:
            assert await _drive(batcher, 300) == [i * 10 for i in range(300)]
            sizes = [size for _, _, size in aimd.history]
            # 2 ms + 1 ms/row: batches grow by one until a batch of 19 rows costs 21 ms.
            assert sizes[:5] == [2, 3, 4, 5, 6]
            peak = max(sizes)
            assert peak == 19
            assert 9 in sizes[sizes.index(19) :]  # 19 rows took 21 ms > 20: halve to 9
            # Now every row costs 4 ms: the size collapses to what fits (4 rows = 18 ms).
            clock.per_row_ms = 4.0
            aimd.history.clear()
            await _drive(batcher, 200)
            sizes = [size for _, _, size in aimd.history]
            assert max(sizes[5:]) <= 5
            assert sizes[0] < peak
            previous = aimd.history[0][2]
            for rows, latency, size in aimd.history[1:]:
                if latency > 20:
                    assert size == max(1, previous // 2)
                elif rows >= previous:
                    assert size == previous + 1
                previous = size

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
