"""The online store's reads on the event loop (feature_repo/redis_wire.py RedisPipe) against a
real redis-server of the test's own: the same rows and progress as the blocking reads; a paused
Redis is a timeout within the read timeout and the next read after it works; a restarted Redis
is read again on a new connection."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from examples.delivery.features import restaurant_orders, zone_couriers
from feature_repo.errors import OnlineStoreUnavailableError
from feature_repo.online import RedisOnlineStore
from feature_repo.online_store import OnlineRow
from tests.helpers.faults import own_redis
from tests.integration.test_online_store import random_values

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

END = 1_700_000_040_000


def rows_of(view, n: int, rng: random.Random) -> list[OnlineRow]:
    return [
        OnlineRow(f"{view.name}-{i}", END + 60_000 * (i % 3), random_values(view, rng))
        for i in range(n)
    ]


def test_reads_on_the_loop_equal_the_blocking_reads(tmp_path: Path):
    rng = random.Random(7)
    with own_redis(tmp_path) as (_, url), RedisOnlineStore(url, "pipe_test") as online:
        assert online.reads_async
        requests = []
        for view in (restaurant_orders, zone_couriers):
            rows = rows_of(view, 40, rng)
            online.write(view, rows)
            online.write(
                view,
                [OnlineRow(r.entity_key, r.window_end_ms + 60_000, r.values) for r in rows[:10]],
            )
            requests.append((view, [r.entity_key for r in rows] + [f"{view.name}-never"]))
        online.write_progress(restaurant_orders, 0, 2, END + 60_000)
        online.write_progress(restaurant_orders, 1, 2, END + 120_000)
        views = [restaurant_orders, zone_couriers]

        async def on_loop() -> tuple[Any, Any, dict[str, int]]:
            many = await online.read_many_async(requests, as_of_ms=END + 90_000)
            everything = await online.read_many_async(requests)
            online._progress.clear()
            progress = await online.read_progress_async(views)
            online.close()  # on its loop
            return many, everything, progress

        many, everything, progress = asyncio.run(on_loop())
        assert many == online.read_many(requests, as_of_ms=END + 90_000)
        assert everything == online.read_many(requests)
        assert sum(row is not None for rows in everything for row in rows) == 80
        online._progress.clear()
        assert progress == online.read_progress(views) == {restaurant_orders.name: END + 60_000}


def test_a_paused_redis_times_out_and_the_next_read_works(tmp_path: Path):
    with (
        own_redis(tmp_path) as (proc, url),
        RedisOnlineStore(url, "pipe_test", read_timeout_s=0.2, connect_timeout_s=1.0) as online,
    ):
        view = zone_couriers
        online.write(view, rows_of(view, 5, random.Random(1)))
        requests = [(view, [f"{view.name}-{i}" for i in range(5)])]

        async def scenario() -> tuple[float, Any]:
            await online.read_many_async(requests)  # the connection is open
            os.kill(proc.pid, signal.SIGSTOP)
            started = time.perf_counter()
            try:
                with pytest.raises(OnlineStoreUnavailableError, match="did not answer"):
                    await online.read_many_async(requests)
                waited = time.perf_counter() - started
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            after = await online.read_many_async(requests)
            online.close()
            return waited, after

        waited, after = asyncio.run(scenario())
        assert waited < 2.0, waited  # the read timeout (0.2 s), not the pause
        assert [row.entity_key for row in after[0]] == [f"{view.name}-{i}" for i in range(5)]


def test_a_connection_redis_dropped_is_replaced(tmp_path: Path):
    import redis

    view = zone_couriers
    with own_redis(tmp_path) as (_, url), RedisOnlineStore(url, "pipe_test") as online:
        online.write(view, rows_of(view, 3, random.Random(2)))
        requests = [(view, [f"{view.name}-{i}" for i in range(3)])]

        async def scenario(drop_while_idle: bool) -> Any:
            first = await online.read_many_async(requests)
            with redis.Redis.from_url(url) as admin:  # as a Redis restart or a timeout would
                assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
            if drop_while_idle:
                await asyncio.sleep(0.2)  # the loop sees the connection close
            second = await online.read_many_async(requests)
            online.close()
            assert second == first
            return second

        assert asyncio.run(scenario(True))[0][0] is not None
        # Dropped and not yet noticed: the read fails on the old connection, once, and is
        # sent again on a new one.
        assert asyncio.run(scenario(False))[0][0] is not None
