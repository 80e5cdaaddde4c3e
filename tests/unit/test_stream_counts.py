"""The tile engine's counts: events counted when read, processed when their tile closes, open
in between (core/stream_stats.WindowCounts.open, streaming/monitor.ViewReport.balanced), and
carried across runs in the job's state (streaming/tile_counts.py, StreamStats.restored)."""

from __future__ import annotations

from typing import Any, cast

import orjson
import pytest

from core.errors import RecordError
from core.settings import Settings
from core.stream_stats import PrepareCounts, StreamStats, WindowCounts
from streaming.monitor import ViewReport
from streaming.sinks import JobContext, StatsReporter
from streaming.tile_counts import CarriedCounts


def test_a_run_balances_with_its_open_events_and_not_without():
    # Run 1 read 100: 60 aggregated, 5 late, 35 in tiles still open at its stop.
    run1 = ViewReport(events=100, aggregated=60, late=5, open=35)
    # Run 2 read 50 and closed run 1's 35 open ones too, leaving 4 open: open = 4 - 35.
    run2 = ViewReport(events=50, aggregated=80, filtered=1, open=4 - 35)
    assert run1.balanced()
    assert run2.balanced()
    assert run1.open + run2.open == 4  # what the last stop left open
    assert not ViewReport(events=100, aggregated=60, late=5, open=34).balanced()
    assert not ViewReport(events=100, aggregated=60, late=5).balanced()


def test_open_round_trips_and_older_records_without_it_read_as_zero():
    record = StreamStats("run1", "v", 0, WindowCounts(aggregated=9, open=-3), True, 1)
    assert StreamStats.decode(record.encode()) == record
    older = orjson.loads(record.encode())
    del older["open"]
    decoded = StreamStats.decode(orjson.dumps(older))
    assert decoded.counts == WindowCounts(aggregated=9, open=0)


class _State:
    """PyFlink's ValueState of the side key, in memory."""

    def __init__(self, value: Any = None) -> None:
        self._value = value

    def value(self) -> Any:
        return self._value

    def update(self, value: Any) -> None:
        self._value = value


class _Producer:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def produce(self, topic: str, value: bytes, key: str, timestamp_ms: int) -> None:
        self.sent.append(value)


def _instance(state: _State) -> tuple[CarriedCounts, PrepareCounts, WindowCounts, Any]:
    producer = _Producer()
    stats = StatsReporter(cast(Any, producer), JobContext(Settings(), "run"), "v", 0)
    read, windows = PrepareCounts(), WindowCounts()
    return CarriedCounts(state, read, windows, stats), read, windows, (stats, producer)


def test_counters_in_the_side_keys_state_continue_after_a_restore():
    state = _State()
    carried, read, windows, (stats, producer) = _instance(state)
    stats.report(read)
    assert StreamStats.decode(producer.sent[-1]).restored is None  # not read from state yet
    carried.load()  # a fresh start: nothing restored
    read.events, read.late, read.heartbeats = 100, 5, 7
    windows.aggregated, windows.duplicates, windows.open = 50, 2, 43
    carried.save()
    stats.report(read)
    stats.report(windows)
    first = [StreamStats.decode(v) for v in producer.sent[-2:]]
    assert first[0].restored == {
        "events": 0,
        "late": 0,
        "filtered": 0,
        "rejected": 0,
        "heartbeats": 0,
    }
    assert first[1].restored == {"aggregated": 0, "duplicates": 0, "open": 0}
    read.events += 1  # counted after the snapshot below: not in it
    snapshot = _State(state.value())
    # Run 2 restores the snapshot: counts from zero again, names what the snapshot held.
    carried, read, windows, (stats, producer) = _instance(snapshot)
    carried.load()
    read.events, windows.aggregated, windows.open = 20, 60, -40  # closed 40 restored ones
    carried.save()
    assert snapshot.value()["events"] == 120
    assert snapshot.value()["open"] == 3
    stats.report(read, final=True)
    stats.report(windows, final=True)
    records = [StreamStats.decode(v) for v in producer.sent]
    assert records[0].restored == {
        "events": 100,
        "late": 5,
        "filtered": 0,
        "rejected": 0,
        "heartbeats": 7,
    }
    assert records[1].restored == {"aggregated": 50, "duplicates": 2, "open": 43}
    carried.load()  # once per run: later calls keep what was restored
    assert carried.restored is not None
    assert carried.restored["events"] == 100


def test_a_report_adds_what_a_run_restored_to_its_own_counts():
    run1 = ViewReport(events=100, aggregated=50, duplicates=2, late=5, open=43, rows=9)
    restored = {"events": 100, "late": 5, "aggregated": 50, "duplicates": 2, "open": 43}
    run2 = ViewReport(events=20, aggregated=60, open=-40, rows=4, restored=restored)
    assert run1.balanced()
    assert run2.balanced()
    total = run2.cumulative()
    assert (total.events, total.aggregated, total.open, total.late) == (120, 110, 3, 5)
    assert total.balanced()
    assert total.rows == 4  # rows written are not carried
    assert total.restored is None
    assert run1.cumulative() == run1  # nothing restored (the event engine)


def test_restored_round_trips_and_a_bad_one_names_the_field():
    counts = WindowCounts(aggregated=9, open=-3)
    restored = {"aggregated": 4, "duplicates": 0, "open": 2}
    record = StreamStats("run1", "v", 0, counts, True, 1, restored)
    assert StreamStats.decode(record.encode()) == record
    assert "restored" not in orjson.loads(StreamStats("r", "v", 0, counts, True, 1).encode())
    for bad, field, reason in (
        ({"events": 1}, "restored.events", "not a counter that windows records carry"),
        ({"open": "2"}, "restored.open", "integer"),
        ({"open": None}, "restored.open", "expected an integer, got null"),
        ([1], "restored", "an object"),
    ):
        data = orjson.loads(record.encode()) | {"restored": bad}
        with pytest.raises(RecordError, match=reason) as caught:
            StreamStats.decode(orjson.dumps(data))
        assert caught.value.field == field
