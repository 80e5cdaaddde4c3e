"""The stream's availability rules without a JVM: an event exactly allowed_lateness behind
counts and one ms more is late; quiet partitions (ingest's heartbeats, or opt-in Flink
idleness), a wholly quiet topic and quiet keys hold no window past its servable time; the same
event twice counts once and its id leaves with its tile; late events are dead-lettered per view.

A live job is modelled by wall time: events arrive as scheduled with event time = wall time,
Flink's source (SourceModel) emits a per-partition watermark every 100 ms, ingest's
HeartbeatClock writes heartbeats as run_ingest does, and TimerModel fires the window engine.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

import orjson

from examples.delivery.features import restaurant_orders
from examples.delivery.sources import ORDERS
from features.definitions import Aggregation, AggregationFunction, FeatureView, Window
from features.reference import compute_view, with_closing_rows
from features.validation import Rejection
from streaming.compile import compile_view
from streaming.prepare import EventPreparer
from tests.helpers.stream import MAX_WM, MIN_WM, TimerModel, row_differences

START = 1_767_225_600_000  # 2026-01-01T00:00Z


class SourceModel:
    """Flink's Kafka source as the job configures it: per partition, the newest record time
    less allowed_lateness; the watermark is the minimum over the partitions that are not idle
    (no record for idle_timeout_ms of processing time; 0: never idle). It never goes back, and
    it holds while every partition is idle."""

    def __init__(self, partitions: int, lateness_ms: int, idle_timeout_ms: int) -> None:
        self.newest = [MIN_WM] * partitions
        self.last_record_at = [0] * partitions
        self.lateness_ms = lateness_ms
        self.idle_timeout_ms = idle_timeout_ms
        self.watermark = MIN_WM

    def record(self, partition: int, timestamp: int, now: int) -> None:
        self.newest[partition] = max(self.newest[partition], timestamp)
        self.last_record_at[partition] = now

    def emit(self, now: int) -> int:
        active = [
            newest
            for newest, at in zip(self.newest, self.last_record_at, strict=True)
            if not self.idle_timeout_ms or now - at < self.idle_timeout_ms
        ]
        if active and min(active) > MIN_WM:
            self.watermark = max(self.watermark, min(active) - self.lateness_ms)
        return self.watermark


EVERY_5S = (Window.sliding("1m", every="5s"),)
LIVE = FeatureView(
    name="live_orders",
    entity=restaurant_orders.entity,
    source=ORDERS,
    aggregations=(
        Aggregation(function=AggregationFunction.COUNT, windows=EVERY_5S),
        Aggregation(function=AggregationFunction.SUM, column="items", windows=EVERY_5S),
    ),
)
LIVE_LATENESS_MS = int(LIVE.lateness.total_seconds() * 1000)
Schedule = list[tuple[int, int, dict[str, Any]]]  # (wall ms, partition, event)


def order(key: str, t: int, n: int = 0) -> dict[str, Any]:
    return {"order_id": f"o{n}", "restaurant_id": key, "items": 1 + n % 3, "placed_at": t}


def partition_of(key: str) -> int:
    return zlib.crc32(key.encode()) % 4


def live_traffic(keys: list[str], start: int, seconds: int, per_10ms: int = 3) -> Schedule:
    """~300 events/s (3 per 10 ms), event time = wall time, keys round robin."""
    out: Schedule = []
    n = 0
    for wall in range(start, start + seconds * 1000, 10):
        for _ in range(per_10ms):
            key = keys[n % len(keys)]
            out.append((wall, partition_of(key), order(key, wall, n)))
            n += 1
    return out


def live_run(
    schedule: Schedule, *, until: int, idle_timeout_ms: int, heartbeat_ms: int = 0
) -> TimerModel:
    """A live job driven by wall time: events arrive as scheduled; the source emits a
    watermark every 100 ms; with heartbeat_ms, ingest's HeartbeatClock writes heartbeats to
    quiet partitions as run_ingest does (it looks every 250 ms)."""
    from events.ingest import HeartbeatClock

    lateness = int(LIVE.source.allowed_lateness.total_seconds() * 1000)
    source = SourceModel(4, lateness, idle_timeout_ms)
    model = TimerModel(LIVE, random.Random(0))
    model.rng = random.Random(1)
    start = schedule[0][0]
    clock = HeartbeatClock({LIVE.source.topic: 4}, heartbeat_ms, lambda: model.now)
    i = 0
    for wall in range(start, until, 10):
        model.now = wall
        while i < len(schedule) and schedule[i][0] <= wall:
            _, partition, event = schedule[i]
            i += 1
            source.record(partition, event["placed_at"], wall)
            clock.delivered(LIVE.source.topic, partition, event["placed_at"])
            model.process(event)
        if wall % 250 == 0:
            for _topic, partition, stamp in clock.due():
                source.record(partition, stamp, wall)
        if wall % 100 == 0:
            model.advance(source.emit(wall))
    return model


def late_rows(model: TimerModel, budget_ms: int = 0) -> list[tuple[tuple[str, int], int]]:
    """Rows fired more than budget_ms after their servable time (end + view lateness), with
    how late. The model has no processing time; the real job adds ~0.3 s, within the 1 s that
    the stream may take past the servable time."""
    return sorted(
        (key_end, fired - key_end[1] - LIVE_LATENESS_MS)
        for key_end, fired in model.fired_at.items()
        if fired > key_end[1] + LIVE_LATENESS_MS + budget_ms
    )


def test_an_event_exactly_allowed_lateness_behind_counts_one_ms_more_is_late():
    lateness = int(LIVE.source.allowed_lateness.total_seconds() * 1000)
    assert lateness == 2000, "sources wait 2 s for late events by default"
    source = SourceModel(1, lateness, 0)
    model = TimerModel(LIVE, random.Random(0))
    end = START + 60_000  # a slide boundary
    newest = end + lateness
    for t in (START + 10_000, newest):
        source.record(0, t, 0)
        model.process(order("r1", t))
    model.advance(source.emit(0))
    assert model.watermark == end
    exactly, one_more = order("r1", newest - lateness, 1), order("r1", newest - lateness - 1, 2)
    model.process(exactly)
    model.process(one_more)
    assert model.late == [one_more]
    model.advance(MAX_WM)
    want = with_closing_rows(LIVE, compute_view(LIVE, model.counted))
    assert row_differences(model.rows, want) == []
    assert model.rows[("r1", end + 5_000)]["count_1m"] == 3  # exactly, and the two before


def quiet_partition_schedule() -> tuple[Schedule, int]:
    """Partition 3 gets one record and goes quiet while the others move for 30 s."""
    keys = [k for k in (f"r{i}" for i in range(40)) if partition_of(k) != 3][:8]
    quiet = next(k for k in (f"q{i}" for i in range(40)) if partition_of(k) == 3)
    return [(START, 3, order(quiet, START)), *live_traffic(keys, START + 10, 30)], START + 30_000


def test_a_quiet_partition_gets_heartbeats_and_holds_no_window_back():
    schedule, stop = quiet_partition_schedule()
    allowed = int(LIVE.source.allowed_lateness.total_seconds() * 1000)
    held = live_run(schedule, until=stop + 10_000, idle_timeout_ms=0)
    assert held.watermark == START - allowed, "with nothing for it, partition 3 holds everything"

    model = live_run(schedule, until=stop + 10_000, idle_timeout_ms=0, heartbeat_ms=1000)
    closed = {k: v for k, v in model.rows.items() if k[1] + LIVE_LATENESS_MS <= stop}
    assert len({end for _, end in closed}) >= 4
    assert late_rows(model) == []
    want = with_closing_rows(LIVE, compute_view(LIVE, model.counted))
    assert row_differences(closed, {k: v for k, v in want.items() if k in closed}) == []
    assert not model.late


def test_flink_idleness_is_opt_in_and_closes_windows_of_a_partition_nothing_writes():
    """Without heartbeats (events produced straight to the topic), JobOptions.idle_timeout_s
    lets partition 3 stop holding the watermark back after it; the DDL carries it for live
    runs only (a bounded run waits for every partition's last records)."""
    from streaming.compile import source_table_sql
    from streaming.job import JobOptions

    assert JobOptions().idle_timeout_s == 0, "off: in band heartbeats are safe in a catch-up"
    compiled = compile_view(LIVE)
    live = source_table_sql(compiled, "t", "b:1", {}, None, idle_timeout_ms=2000)
    assert "'scan.watermark.idle-timeout' = '2000 ms'" in live
    assert "idle-timeout" not in source_table_sql(compiled, "t", "b:1", {}, {0: 5})

    idle_ms = 2000
    allowed = int(LIVE.source.allowed_lateness.total_seconds() * 1000)
    assert allowed + idle_ms <= LIVE_LATENESS_MS - 1000, "idleness fits in the lateness"
    schedule, stop = quiet_partition_schedule()
    model = live_run(schedule, until=stop + 10_000, idle_timeout_ms=idle_ms)
    closed = {k: v for k, v in model.rows.items() if k[1] + LIVE_LATENESS_MS <= stop}
    assert len({end for _, end in closed}) >= 4
    assert late_rows(model) == []
    assert not model.late


def test_when_everything_goes_quiet_heartbeats_close_the_last_windows_on_time():
    keys = [f"r{i}" for i in range(10)]
    assert {partition_of(k) for k in keys} == {0, 1, 2, 3}
    stop = START + 20_000
    schedule = live_traffic(keys, START, 20)
    until = stop + 80_000  # the last closing rows end 65 s after the last event

    without = live_run(schedule, until=until, idle_timeout_ms=2000)
    want = with_closing_rows(LIVE, compute_view(LIVE, without.counted))
    assert max(end for _, end in without.rows) < stop, "nothing closes after traffic stops"

    model = live_run(schedule, until=until, idle_timeout_ms=2000, heartbeat_ms=1000)
    assert not model.late
    assert row_differences(model.rows, want) == [], "every window closed, closing rows too"
    assert not model.states
    assert late_rows(model) == []
    after_stop = [k for k in model.rows if k[1] > stop]
    assert len(after_stop) > len(keys) * 10


def test_a_quiet_key_gets_its_rows_and_closing_row_on_time():
    """r-quiet has events for 3 s only, on a partition others keep busy: its rows at the
    following ends (the window still holds its events) and its closing row come on time."""
    busy = [k for k in (f"r{i}" for i in range(40)) if partition_of(k) == 0][:3]
    quiet = next(k for k in (f"r-quiet{i}" for i in range(40)) if partition_of(k) == 0)
    schedule = sorted(
        live_traffic(busy, START, 90) + live_traffic([quiet], START + 5, 3, per_10ms=1),
        key=lambda item: item[0],
    )
    model = live_run(schedule, until=START + 95_000, idle_timeout_ms=2000, heartbeat_ms=1000)
    ends = sorted(end for key, end in model.rows if key == quiet)
    last_event = START + 5 + 2990
    assert ends[-1] == closing_end_5s(last_event), "the closing row was emitted"
    assert ends == list(range(ends[0], ends[-1] + 1, 5_000)), "a row at every end"
    assert model.rows[(quiet, ends[-1])] == {"count_1m": 0, "sum_items_1m": 0}
    assert late_rows(model) == []


def closing_end_5s(t: int) -> int:
    return t - t % 5_000 + 60_000 + 5_000


def test_the_same_event_twice_counts_once_and_ids_leave_with_their_tile():
    from streaming.windows import open_ids

    model = TimerModel(LIVE, random.Random(0))
    first, second = order("r1", START + 1_000, 1), order("r1", START + 2_000, 2)
    for event in (first, second, dict(first), first | {"items": 9}, dict(second)):
        model.process(event)
    assert model.duplicates == [first, second]
    assert len(model.counted) == 3  # a different value is a different event
    state = model.states["r1"]
    assert open_ids(state) == 3
    model.advance(START + 5_000)  # the tile [0, 5 s) closed; it stays for the 1 m window
    assert state[1], "the tile is still held for the windows it is in"
    assert open_ids(state) == 0, "no id is held for a closed tile"
    model.advance(MAX_WM)
    want = with_closing_rows(LIVE, compute_view(LIVE, model.counted))
    assert row_differences(model.rows, want) == []
    assert model.rows[("r1", START + 5_000)]["count_1m"] == 3


def test_late_events_are_dead_lettered_for_each_view_they_are_late_for():
    from core.records import DeadLetter
    from streaming.sinks import DeadLetters, JobContext

    class Producer:
        def __init__(self) -> None:
            self.sent: list[tuple[str, bytes, Any]] = []

        def produce(self, topic: str, value: bytes, key: Any, ts: int, headers: Any) -> None:
            self.sent.append((topic, value, headers))

    per_minute = LIVE.model_copy(
        update={
            "name": "live_orders_1m",
            "aggregations": (
                Aggregation(
                    function=AggregationFunction.COUNT, windows=(Window.sliding("5m", "1m"),)
                ),
            ),
        }
    )
    watermark = START + 20_000
    event = orjson.dumps(order("r1", START + 12_000))  # bucket ends: 15 s (5 s), 60 s (1 m)
    producer = Producer()
    ctx = JobContext(settings=_settings(), run_id="t")
    for view in (LIVE, per_minute):
        outcome = EventPreparer(compile_view(view)).prepare(event, watermark)
        if isinstance(outcome, Rejection):
            DeadLetters(producer, ctx, view).send(outcome, event, b"r1", 2, 41)  # type: ignore[arg-type]
    assert len(producer.sent) == 1
    topic, value, headers = producer.sent[0]
    letter = DeadLetter.from_headers(headers)
    assert (topic, value) == (ctx.settings.dead_letter_topic, event)
    assert (letter.reason, letter.view, letter.partition, letter.offset) == (
        "late",
        LIVE.name,
        2,
        41,
    )


def _settings() -> Any:
    from core.settings import load_settings

    return load_settings()
