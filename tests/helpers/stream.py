"""Shared by the stream engine's tests (unit and Flink): test views, row comparison, and
the Kafka helpers of the Flink tests (a topic that tracks offsets, reading a topic back)."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from core.kafka import PRODUCER_DEFAULTS
from core.settings import Settings
from examples.delivery.features import restaurant_orders, zone_couriers
from examples.delivery.sources import ORDERS
from features.definitions import Aggregation, AggregationFunction, FeatureView, Window
from features.schema import EventSource
from features.validation import EventValidator, ValidEvent

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
        self.events: list[Event] = []
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

    def flush(self) -> None:
        assert self.producer.flush(30) == 0


def closing_end(view: FeatureView, t: int) -> int:
    """End of the closing row of an entity whose only event is at t."""
    return t - t % view.slide_ms + view.max_window.size_ms + view.slide_ms


def read_all(settings: Settings, topic: str, idle_s: float = 2.0) -> Iterator[Message]:
    """Every record of a topic, by assignment (no group join), until idle."""
    consumer = Consumer(settings.kafka_client_config(**{"group.id": f"r-{uuid.uuid4().hex}"}))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        last = time.monotonic()
        while time.monotonic() - last < idle_s:
            for msg in consumer.consume(1000, timeout=0.2):
                if msg.error() is None:
                    last = time.monotonic()
                    yield msg
    finally:
        consumer.close()
