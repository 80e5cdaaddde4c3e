"""Shared by the stream engine's tests (unit and Flink): test views, row comparison, a model
of the job's timers driving the window engine without a JVM, and the Kafka helpers of the
Flink tests (a topic that tracks offsets, reading a topic back)."""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from core.kafka import PRODUCER_DEFAULTS
from core.records import HEARTBEAT_HEADERS, HEARTBEAT_VALUE, is_heartbeat
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
