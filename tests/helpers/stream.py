"""Shared by the stream engine's tests (unit and Flink): test views, row comparison, a model
of the job's timers driving the window engine without a JVM, and the Kafka helpers of the
Flink tests (a topic that tracks offsets, reading a topic back, the restart scenario)."""

from __future__ import annotations

import math
import random
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from core.kafka import PRODUCER_DEFAULTS, ensure_topics
from core.records import HEARTBEAT_HEADERS, HEARTBEAT_VALUE, FeatureRow, is_heartbeat
from core.settings import Settings
from examples.delivery.features import restaurant_orders, zone_couriers
from examples.delivery.sources import ORDERS
from features.definitions import Aggregation, AggregationFunction, FeatureView, Window
from features.schema import EventSource
from features.validation import EventValidator, Rejection, RejectReason, ValidEvent
from streaming.compile import compile_view
from streaming.prepare import EventPreparer, Filtered
from streaming.windows import Added, WindowEngine, new_state

if TYPE_CHECKING:
    from confluent_kafka import Message

# Exercises what the example views do not: filter, derived columns, min, max, last of strings
# and ints, count_distinct, a 5-minute slide and several window sizes.
ORDER_STATS = FeatureView(
    name="order_stats",
    entity=restaurant_orders.entity,
    source=ORDERS,
    filter="items >= 2 and zone_id != 'z03'",
    derived={"per_item": "subtotal / items", "big": "subtotal > 40.0"},
    aggregations=(
        Aggregation(
            function=AggregationFunction.MIN,
            column="per_item",
            windows=(Window.sliding("10m", every="5m"), Window.sliding("30m", every="5m")),
        ),
        Aggregation(
            function=AggregationFunction.MAX,
            column="subtotal",
            windows=(Window.sliding("10m", every="5m"),),
        ),
        Aggregation(
            function=AggregationFunction.LAST,
            column="zone_id",
            windows=(Window.sliding("30m", every="5m"),),
        ),
        Aggregation(
            function=AggregationFunction.LAST, column="items", windows=(Window.tumbling("5m"),)
        ),
        Aggregation(
            function=AggregationFunction.COUNT_DISTINCT,
            column="big",
            windows=(Window.sliding("30m", every="5m"),),
        ),
        Aggregation(
            function=AggregationFunction.STDDEV,
            column="distance_km",
            windows=(Window.sliding("10m", every="5m"),),
        ),
        Aggregation(function=AggregationFunction.COUNT, windows=(Window.tumbling("5m"),)),
    ),
    ttl=timedelta(hours=1),
)
STREAM_VIEWS = (restaurant_orders, zone_couriers, ORDER_STATS)


def same_value(a: Any, b: Any) -> bool:
    """ints and strings equal, floats within 1e-9 relative, nulls equal."""
    if a is None or b is None:
        return a is b
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-9)
    return type(a) is type(b) and a == b


def row_differences(
    got: Mapping[tuple[str, int], Mapping[str, Any]],
    want: Mapping[tuple[str, int], Mapping[str, Any]],
) -> list[str]:
    problems = [f"missing row {k}: {want[k]}" for k in sorted(set(want) - set(got))]
    problems += [f"extra row {k}: {got[k]}" for k in sorted(set(got) - set(want))]
    for k in sorted(set(got) & set(want)):
        bad = {
            name: (got[k].get(name), value)
            for name, value in want[k].items()
            if not same_value(got[k].get(name), value)
        }
        if bad or set(got[k]) != set(want[k]):
            problems.append(f"row {k}: (got, want) {bad or set(got[k]) ^ set(want[k])}")
    return problems


MIN_WM = -(2**63)
MAX_WM = 2**63 - 1


class TimerModel:
    """Drives WindowEngine the way the Flink job does, with PyFlink's timer behaviour: timers
    fire in rounds, a timer registered in a firing that is already due fires in a later round,
    the same timestamp may fire twice, and a watermark that jumps fires far ends before near
    ones."""

    def __init__(self, view: FeatureView, rng: random.Random) -> None:
        self.compiled = compile_view(view)
        self.preparer = EventPreparer(self.compiled)
        self.engine = WindowEngine(self.compiled)
        self.rng = rng
        self.states: dict[str, list[Any]] = {}
        self.timers: set[tuple[int, str]] = set()
        self.watermark = MIN_WM
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}
        self.late: list[dict[str, Any]] = []
        self.counted: list[dict[str, Any]] = []  # counted once (or filtered): not late
        self.duplicates: list[dict[str, Any]] = []
        self.aggregated: list[bytes] = []  # the bytes of each event added to a tile
        self.now = 0  # wall ms, set by live_run
        self.fired_at: dict[tuple[str, int], int] = {}  # row -> wall ms it was emitted

    def advance(self, watermark: int) -> None:
        self.watermark = max(self.watermark, watermark)
        while due := [t for t in self.timers if t[0] <= self.watermark]:
            self.timers -= set(due)
            self.rng.shuffle(due)  # any order, even far ends before near ones
            registered = []
            for ts, key in due:
                state = self.states.get(key)
                if state is None:
                    continue
                upto = max(ts, self.watermark) if self.rng.random() < 0.5 else ts
                for end, values in self.engine.fire(state, upto):
                    assert (key, end) not in self.rows, f"row {(key, end)} emitted twice"
                    self.rows[(key, end)] = values
                    self.fired_at[(key, end)] = self.now
                following = self.engine.next_timer(state)
                if following is None:
                    del self.states[key]
                else:
                    registered.append((following, key))
            # Registered during the round, they fire in the next one, even if already due.
            self.timers |= set(registered) | {(ts, k) for ts, k in due if self.rng.random() < 0.1}

    def process(self, event: dict[str, Any]) -> None:
        outcome = self.preparer.prepare(orjson.dumps(event), self.watermark)
        if isinstance(outcome, Rejection):
            assert outcome.reason is RejectReason.LATE
            self.late.append(event)
            return
        if isinstance(outcome, Filtered):
            self.counted.append(event)
            return
        state = self.states.setdefault(outcome.key, new_state())
        added = self.engine.add(state, outcome.t, outcome.values, outcome.event_id)
        if added is Added.DUPLICATE:
            self.duplicates.append(event)
            return
        self.counted.append(event)
        self.aggregated.append(orjson.dumps(event))
        if added is Added.NEW_TILE:
            self.timers.add((self.engine.bucket(outcome.t) + self.compiled.slide_ms, outcome.key))


PARTITIONS = 4
START = 1_767_268_800_000  # 2026-01-01 12:00 UTC: the lunch rush
Event = dict[str, Any]


def hand_made(source: EventSource, t: int, entity: str) -> Event:
    """A valid event that passes every test view's filter (items >= 2, zone not z03)."""
    if source.name == "orders":
        return {
            "order_id": f"o-hand-{entity}-{t}",
            "restaurant_id": entity,
            "zone_id": "z01",
            "items": 3,
            "subtotal": 42.5,
            "distance_km": 2.5,
            "placed_at": t,
        }
    return {
        "courier_id": f"c-hand-{t % 7}",
        "zone_id": entity,
        "speed_kmh": 17.5,
        "lat": 52.5,
        "lon": 13.4,
        "pinged_at": t,
    }


class Topic:
    """One source topic: what was produced where, with delivery-confirmed offsets."""

    def __init__(self, settings: Settings, source: EventSource) -> None:
        from confluent_kafka import Producer

        self.source = source
        self.validator = EventValidator(source)
        self.producer = Producer(settings.kafka_client_config(**PRODUCER_DEFAULTS))
        self.events: list[Event] = []  # as produced, repeats included
        self.heartbeats = 0
        self.next_offset = dict.fromkeys(range(PARTITIONS), 0)
        self.max_time = dict.fromkeys(range(PARTITIONS), -1)

    def canonical(self, event: Event) -> ValidEvent:
        valid = self.validator.validate_object(event, now_ms=START + 86_400_000)
        assert isinstance(valid, ValidEvent), valid
        return valid

    def produce(self, event: Event, partition: int | None = None) -> None:
        valid = self.canonical(event)
        self.events.append(valid.values)

        def delivered(err: Any, msg: Message) -> None:
            assert err is None, err
            p, offset = msg.partition() or 0, msg.offset() or 0
            assert offset == self.next_offset[p], "offsets of a fresh topic are contiguous"
            self.next_offset[p] += 1
            self.max_time[p] = max(self.max_time[p], valid.event_time_ms)

        self.producer.produce(
            self.source.topic,
            valid.to_json(),
            valid.key,
            # -1: the keyed partitioner picks, as for ingest's records.
            partition=-1 if partition is None else partition,
            timestamp=valid.event_time_ms,
            on_delivery=delivered,
        )

    def heartbeat(self, partition: int, timestamp_ms: int) -> None:
        """A heartbeat record as ingest writes it (events/ingest.py): not an event."""

        def delivered(err: Any, msg: Message) -> None:
            assert err is None, err
            assert msg.offset() == self.next_offset[partition]
            self.next_offset[partition] += 1
            self.max_time[partition] = max(self.max_time[partition], timestamp_ms)

        self.heartbeats += 1
        self.producer.produce(
            self.source.topic,
            HEARTBEAT_VALUE,
            partition=partition,
            timestamp=timestamp_ms,
            headers=HEARTBEAT_HEADERS,
            on_delivery=delivered,
        )

    def unique_events(self) -> list[Event]:
        """The events produced, each once (a repeat has the same canonical bytes)."""
        return list({orjson.dumps(e): e for e in self.events}.values())

    def flush(self) -> None:
        assert self.producer.flush(30) == 0


def closing_end(view: FeatureView, t: int) -> int:
    """End of the closing row of an entity whose only event is at t."""
    return t - t % view.slide_ms + view.max_window.size_ms + view.slide_ms


def patient_store(settings: Settings) -> Any:
    """The online store, read with a 10 s timeout: the predictor's read timeout (100 ms,
    redis_read_timeout_ms) is a deadline for requests, and tests that check, poll or seed
    values are not testing it; on a loaded CI machine (two test workers, Flink and Spark
    beside them) one read took longer (a stream test failed on it once). The monitor,
    dashboard, serving and cluster tests seed and read through it too."""
    from feature_repo.online_store import open_online_store

    return open_online_store(settings.model_copy(update={"redis_read_timeout_ms": 10_000.0}))


def wait_until_reading(log: Path, views: list[str], limit_s: float, max_lag: int = 20) -> float:
    """Wait until `sluice stream` (its ``--report-every`` lines in ``log``) runs and has caught
    up with every view's topic: a progress line that counts ingest's heartbeats (its operators
    process records) with a lag of at most ``max_lag`` records. Seconds waited; AssertionError
    after ``limit_s``."""
    started = time.monotonic()
    line = r": .*, lag ([\d,]+), .*, heartbeats ([\d,]+)$"
    pattern = {v: re.compile(f"^{re.escape(v)}{line}", re.MULTILINE) for v in views}

    def running(found: list[tuple[str, str]]) -> bool:
        lag, heartbeats = (int(n.replace(",", "")) for n in found[-1])
        return lag <= max_lag and heartbeats > 0

    while True:
        text = log.read_text() if log.exists() else ""
        if all((found := p.findall(text)) and running(found) for p in pattern.values()):
            return time.monotonic() - started
        waited = time.monotonic() - started
        assert waited < limit_s, f"stream not reading after {limit_s} s:\n{text}"
        time.sleep(0.5)


def read_all(
    settings: Settings, topic: str, idle_s: float = 2.0, *, skip_heartbeats: bool = False
) -> Iterator[Message]:
    """Every record of a topic, by assignment (no group join), until idle. skip_heartbeats:
    leave out ingest's heartbeats, which do not count as activity either (a running ingest
    writes them every second)."""
    consumer = Consumer(settings.kafka_client_config(**{"group.id": f"r-{uuid.uuid4().hex}"}))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        last = time.monotonic()
        while time.monotonic() - last < idle_s:
            for msg in consumer.consume(1000, timeout=0.2):
                if msg.error() is None:
                    if skip_heartbeats and is_heartbeat(msg.headers()):
                        continue
                    last = time.monotonic()
                    yield msg
    finally:
        consumer.close()


@dataclass
class RestartRun:
    """What run_restart_scenario saw: the two runs' reports and the topic both read."""

    topic: Topic
    stopped_at: Any  # streaming.monitor.ViewReport of run 1 (stopped with a savepoint)
    resumed: Any  # ... of run 2 (restored from it)
    final_w: int  # the final watermark: sentinels past it stay in open windows/tiles
    rows_in_topic: int  # records in the view's features topic (its name is the run's own)


def run_restart_scenario(stack_settings: Settings, tmp_path: Path, engine: str) -> RestartRun:
    """The restart tests' scenario (test_flink_restart.py, test_flink_tiles_restart.py): run 1
    reads 15 minutes of simulated courier pings and is stopped (with a savepoint) as soon as a
    probe's closing row is readable online, while later windows are still open in its state;
    10 more minutes, a closing probe and a sentinel per partition follow; run 2 restores the
    savepoint, reads only what run 1 had not, and finishes the windows that were open.
    Checks what holds for every engine (stop and restore, no late events, together the runs
    emit exactly the reference rows up to the final watermark, windows open at the stop are
    emitted by run 2); the callers check the counts."""
    from examples.delivery.simulate import DeliverySimulator
    from features.reference import compute_view, with_closing_rows
    from streaming.compile import features_topic
    from streaming.runner import run as run_stream

    tag = f"r{uuid.uuid4().hex[:8]}"
    settings = stack_settings.model_copy(
        update={
            "dead_letter_topic": f"{tag}.dead-letter",
            "state_dir": tmp_path,
            "feast_project": tag,
            "stream_engine": engine,
        }
    )
    source = zone_couriers.source.model_copy(update={"topic": f"{tag}.events.courier_pings"})
    view = zone_couriers.model_copy(update={"name": f"zone_couriers_{tag}", "source": source})
    ensure_topics(settings, [source.topic], partitions=PARTITIONS)
    topic = Topic(settings, source)
    lateness = int(source.allowed_lateness.total_seconds() * 1000)
    time_field = source.event_time_field
    pings = (
        e for e in DeliverySimulator(seed=3, start_ms=START).events() if e.source == source.name
    )

    def row_is_online(entity: str, end: int) -> bool:
        with patient_store(settings) as store:
            row = store.read(view, [entity])[0]
        return row is not None and row.window_end_ms >= end

    # Phase A: 15 minutes of pings; a probe at minute 2 closes at minute 13.
    probe_time = START + 2 * 60_000
    probe_end = closing_end(view, probe_time)
    newest = START
    for event in pings:
        values = topic.canonical(event.payload).values
        if values[time_field] >= START + 15 * 60_000:
            break
        if probe_time <= values[time_field] and probe_time > newest:
            topic.produce(hand_made(source, probe_time, "z-probe"))
        topic.produce(values)
        newest = values[time_field]
    topic.flush()
    phase_a = len(topic.events)

    lines: list[str] = []
    first = run_stream(
        settings,
        [view],
        echo=lines.append,
        report_every_s=5,
        should_stop=lambda: row_is_online("z-probe", probe_end),
    )
    assert first.status == "STOPPED"
    assert first.savepoint is not None
    stopped_at = first.views[view.name]
    assert stopped_at.late == 0
    stop_w, newest_a = stopped_at.watermark, newest
    assert stop_w is not None
    assert probe_end <= stop_w <= newest_a - lateness

    # Phase B: 10 more minutes, then a closing probe and a sentinel per partition.
    for event in pings:
        values = topic.canonical(event.payload).values
        if values[time_field] >= START + 25 * 60_000:
            break
        topic.produce(values)
        newest = values[time_field]
    final_w = closing_end(view, newest)
    final_probe = final_w - view.max_window.size_ms - view.slide_ms
    topic.produce(hand_made(source, final_probe, "z-final"))
    for p in range(PARTITIONS):
        topic.produce(hand_made(source, final_w + lateness, f"z-end-{p}"), p)
    topic.flush()
    assert len(topic.events) > phase_a

    second = run_stream(
        settings,
        [view],
        echo=lines.append,
        report_every_s=5,
        should_stop=lambda: row_is_online("z-final", final_w),
    )
    assert any("restoring" in line and "savepoint" in line for line in lines), lines
    resumed = second.views[view.name]
    assert resumed.late == 0

    want = {
        k: v
        for k, v in with_closing_rows(view, compute_view(view, topic.events)).items()
        if k[1] <= final_w
    }
    got: dict[tuple[str, int], Any] = {}
    records = list(read_all(settings, features_topic(view.name)))
    for msg in records:
        row = FeatureRow.decode(msg.value())
        key = (row.entity_key, row.window_end_ms)
        assert key not in got or got[key] == row.values
        got[key] = row.values
    assert row_differences(got, want) == []
    # Windows that were open at the stop, holding events of run 1, were emitted by run 2.
    assert any(stop_w < end <= newest_a + view.max_window.size_ms for _, end in want)
    return RestartRun(topic, stopped_at, resumed, final_w, len(records))


def check_carried_counts(run: RestartRun) -> None:
    """The tile engine's counters are state (streaming/tile_counts.py): run 1 started from zero,
    run 2 restored what run 1 had counted at its savepoint, and restored + run 2's counts are
    the job's totals: every event of the topic read once, balanced over both runs as each run
    balances on its own."""
    from core.stream_stats import CARRIED

    names = [name for kind in CARRIED.values() for name in kind]
    stopped_at, resumed = run.stopped_at, run.resumed
    assert stopped_at.restored == dict.fromkeys(names, 0), "run 1 started afresh"
    at_stop = stopped_at.cumulative()
    assert resumed.restored == {name: getattr(at_stop, name) for name in names}
    total = resumed.cumulative()
    assert total.events == len(run.topic.events), "the totals count every event once"
    # Rows written are carried per shard (streaming/tile_state.ROWS_ENTRY): the totals count
    # every row of the features topic (a stop with a savepoint writes nothing twice).
    assert resumed.restored["rows"] == stopped_at.rows > 0
    assert total.rows == run.rows_in_topic
    assert total.heartbeats == stopped_at.heartbeats + resumed.heartbeats
    assert total.balanced(), total
    processed = total.aggregated + total.duplicates + total.filtered + total.late
    assert processed + total.rejected + total.open == total.events
