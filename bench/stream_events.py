"""bench.stream's events: the simulator's orders and courier pings, validated as ingest would,
preloaded into the events topics, as they are or transformed (a hot key, few keys, a live
density of event time)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import Producer

from core.kafka import PRODUCER_DEFAULTS
from core.settings import Settings
from examples.delivery.simulate import DeliverySimulator
from examples.delivery.sources import COURIER_PINGS, ORDERS
from features.schema import FieldType
from features.validation import EventValidator, ValidEvent

START_MS = 1_767_268_800_000  # 2026-01-01 12:00 UTC, the lunch rush
PARTITIONS = 4


HOT_KEYS = {ORDERS.name: "restaurant_id", COURIER_PINGS.name: "zone_id"}
FEW_KEYS = 8  # entities per view of tiles-30d and tiles-few


def simulated(n: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """The simulator's first n orders and courier pings: (source, payload)."""
    sources = (ORDERS.name, COURIER_PINGS.name)
    events = DeliverySimulator(seed=5, start_ms=START_MS).events()
    picked = ((e.source, e.payload) for e in events if e.source in sources)
    return itertools.islice(picked, n)


def _validated(n: int) -> Iterator[ValidEvent]:
    validators = {s.name: EventValidator(s) for s in (ORDERS, COURIER_PINGS)}
    for source, payload in simulated(n):
        valid = validators[source].validate_object(payload, START_MS + 365 * 86_400_000)
        assert isinstance(valid, ValidEvent)
        yield valid


def compress_time(n: int, density: float) -> Callable[[str, ValidEvent], ValidEvent]:
    """A map of events that moves every time field towards START_MS by one factor, so that
    the first n events span n / density seconds of event time (their order kept)."""
    span_ms = max(max(v.event_time_ms for v in _validated(n)) - START_MS, 1)
    scale = min(n / density * 1000 / span_ms, 1.0)
    fields = {
        s.name: [f.name for f in s.fields if f.type is FieldType.TIMESTAMP]
        for s in (ORDERS, COURIER_PINGS)
    }

    def moved(t: int) -> int:
        return START_MS + round((t - START_MS) * scale)

    def compress(source: str, event: ValidEvent) -> ValidEvent:
        values = dict(event.values)
        for name in fields[source]:
            if isinstance(values.get(name), int):
                values[name] = moved(values[name])
        return dataclasses.replace(event, values=values, event_time_ms=moved(event.event_time_ms))

    return compress


def preload(
    settings: Settings,
    n: int,
    hot: bool = False,
    keys: int | None = None,
    density: float | None = None,
) -> dict[str, dict[int, int]]:
    """n canonical events into events.orders / events.courier_pings; stop offsets per topic.
    ``hot``: every other event of each source belongs to one entity ("hot"); ``keys``: the
    events' entities are folded onto that many ("k0", "k1", ...), in turn; ``density``: the
    events' times compressed to that many events per second of event time (compress_time)."""
    validators = {s.name: EventValidator(s) for s in (ORDERS, COURIER_PINGS)}
    compress = compress_time(n, density) if density else None
    producer = Producer(settings.kafka_client_config(**PRODUCER_DEFAULTS))
    ends: dict[str, dict[int, int]] = {s.topic: {} for s in (ORDERS, COURIER_PINGS)}

    def delivered(err: Any, msg: Any) -> None:
        assert err is None, err
        topic_ends = ends[msg.topic()]
        topic_ends[msg.partition()] = max(topic_ends.get(msg.partition(), 0), msg.offset() + 1)

    for i, (source, payload) in enumerate(simulated(n)):
        if hot and i % 2 == 0:
            payload = payload | {HOT_KEYS[source]: "hot"}
        if keys:
            payload = payload | {HOT_KEYS[source]: f"k{i % keys}"}
        valid = validators[source].validate_object(payload, START_MS + 365 * 86_400_000)
        assert isinstance(valid, ValidEvent)
        if compress:
            valid = compress(source, valid)
        topic = f"events.{source}"
        while True:
            try:
                producer.produce(
                    topic,
                    valid.to_json(),
                    valid.key,
                    timestamp=valid.event_time_ms,
                    on_delivery=delivered,
                )
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0
    for topic_ends in ends.values():
        for p in range(PARTITIONS):
            topic_ends.setdefault(p, 0)
    return ends
