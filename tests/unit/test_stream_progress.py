"""The stream publishes its progress per view after the rows it completes (streaming/sinks.py)."""

from __future__ import annotations

from typing import Any

import pytest

from core.settings import load_settings
from examples.delivery.features import restaurant_orders
from streaming.sinks import END_OF_INPUT, JobContext, RowPublisher


class _Store:
    """Records what reaches the online store, in order."""

    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log

    def write(self, view: Any, rows: Any) -> Any:
        from feature_repo.online_store import WriteReport

        rows = list(rows)
        self.log.append(("rows", [(r.entity_key, r.window_end_ms) for r in rows]))
        return WriteReport(len(rows), len(rows), 0, 0, 1)

    def write_progress(self, view: Any, subtask: int, parallelism: int, progress: int) -> None:
        self.log.append(("progress", view.name, subtask, parallelism, progress))

    def close(self) -> None:
        pass


class _Producer:
    def produce(self, *args: Any, **kwargs: Any) -> None:
        pass


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> tuple[RowPublisher, list[tuple[Any, ...]]]:
    log: list[tuple[Any, ...]] = []
    monkeypatch.setattr("feature_repo.online_store.open_online_store", lambda settings: _Store(log))
    ctx = JobContext(load_settings(), "run")
    return RowPublisher(_Producer(), ctx, restaurant_orders, (1, 2)), log  # type: ignore[arg-type]


def test_a_watermark_is_published_once_a_later_one_is_seen_after_its_rows(published):
    publisher, log = published
    publisher.observe(60_000)  # timers of 60 s may still be firing in this bundle
    publisher.add("r1", 60_000, {"count_5m": 1})
    publisher.flush()
    assert log == [("rows", [("r1", 60_000)])]  # no progress claimed yet
    publisher.observe(61_000)  # everything at or before 60 s has fired
    publisher.add("r2", 60_000, {"count_5m": 2})  # a row of 60 s, fired in this bundle
    publisher.flush()
    assert log[1:] == [
        ("rows", [("r2", 60_000)]),
        ("progress", "restaurant_orders", 1, 2, 60_000),
    ]
    publisher.flush()
    publisher.observe(61_000)  # the same watermark again
    publisher.observe(50_000)  # never backwards
    publisher.flush()
    assert len(log) == 3  # nothing new to publish


def test_at_the_end_of_input_everything_is_published(published):
    publisher, log = published
    publisher.observe(10_000)
    publisher.observe(END_OF_INPUT)
    publisher.flush()
    assert log[-1] == ("progress", "restaurant_orders", 1, 2, 10_000)
    publisher.flush(final=True)
    assert log[-1] == ("progress", "restaurant_orders", 1, 2, END_OF_INPUT)


def test_a_stop_before_the_end_of_input_claims_no_more(published):
    publisher, log = published
    publisher.observe(10_000)
    publisher.observe(20_000)
    publisher.flush(final=True)
    assert log == [("progress", "restaurant_orders", 1, 2, 10_000)]


class _Timers:
    def __init__(self, now: int, watermark: int) -> None:
        self.now, self.watermark = now, watermark
        self.registered: list[int] = []

    def current_processing_time(self) -> int:
        return self.now

    def current_watermark(self) -> int:
        return self.watermark

    def register_processing_time_timer(self, t: int) -> None:
        self.registered.append(t)


class _Context:
    def __init__(self, key: str, timers: _Timers, domain: Any = None) -> None:
        self.key, self.timers, self.domain = key, timers, domain

    def get_current_key(self) -> str:
        return self.key

    def timer_service(self) -> _Timers:
        return self.timers

    def time_domain(self) -> Any:
        return self.domain


def test_a_quiet_operator_keeps_publishing_its_progress_from_clock_ticks(published):
    from pyflink.datastream import TimeDomain

    from streaming.functions import ProgressClock

    publisher, log = published
    clock = ProgressClock(publisher)
    timers = _Timers(now=1_050, watermark=5_000)
    clock.start(_Context("r1", timers))
    clock.start(_Context("r2", timers))  # one chain per instance
    assert timers.registered == [1_200]  # aligned to the tick
    # An event-time timer is not the clock's.
    assert not clock.tick(_Context("r1", timers, TimeDomain.EVENT_TIME))
    # No element for a while: the ticks carry the watermark on.
    for now, watermark in ((1_200, 6_000), (1_400, 7_000)):
        timers.now, timers.watermark = now, watermark
        assert clock.tick(_Context("r1", timers, TimeDomain.PROCESSING_TIME))
    publisher.flush()
    assert log[-1] == ("progress", "restaurant_orders", 1, 2, 6_000)
    assert timers.registered == [1_200, 1_400, 1_600]
    # A chain on another key (restored from a checkpoint) ends at its next tick.
    assert clock.tick(_Context("r9", timers, TimeDomain.PROCESSING_TIME))
    assert timers.registered == [1_200, 1_400, 1_600]


def test_after_a_restore_the_restored_chain_is_adopted(published):
    from pyflink.datastream import TimeDomain

    from streaming.functions import ProgressClock

    publisher, _ = published
    clock = ProgressClock(publisher)
    timers = _Timers(now=2_010, watermark=1)
    assert clock.tick(_Context("r5", timers, TimeDomain.PROCESSING_TIME))
    clock.start(_Context("r1", timers))  # the restored chain runs: no second one
    assert timers.registered == [2_200]
