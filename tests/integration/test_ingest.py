"""Ingest against a real broker: nothing lost, everything routed, counts that add up."""

from __future__ import annotations

import itertools
import random
import uuid
from collections import Counter

import orjson
import pytest
from confluent_kafka import Message

from core.kafka import CountingProducer, ensure_topics, read_topics
from core.records import DeadLetter, is_heartbeat
from core.settings import Settings
from events.ingest import run_ingest
from examples.delivery.produce import default_history_start_ms
from examples.delivery.simulate import DeliverySimulator, corrupt
from examples.delivery.sources import SOURCES
from features.schema import EventSource

pytestmark = pytest.mark.integration


def isolated(sources: tuple[EventSource, ...], tag: str) -> list[EventSource]:
    """Copies of the sources on topics of their own, so tests never see each other's records."""
    return [
        EventSource.model_validate(
            s.model_dump() | {"topic": f"{tag}.events.{s.name}", "raw_topic": f"{tag}.raw.{s.name}"}
        )
        for s in sources
    ]


def test_ingest_routes_every_record_and_counts_balance(stack_settings: Settings):
    tag = f"t{uuid.uuid4().hex[:8]}"
    # Heartbeats due after 50 ms without a record: due many times over while ingest reads
    # the backlog, and never stamped ahead of a raw partition it has not read to its end.
    settings = stack_settings.model_copy(
        update={"dead_letter_topic": f"{tag}.dead-letter", "ingest_heartbeat_ms": 50}
    )
    sources = isolated(SOURCES, tag)
    by_name = {s.name: s for s in sources}
    ensure_topics(settings, [s.raw_topic for s in sources])

    rng = random.Random(3)
    simulator = DeliverySimulator(seed=3, start_ms=default_history_start_ms())
    expected_reasons: Counter[str] = Counter()
    expected_dead: dict[bytes, tuple[str, str | None]] = {}
    good: Counter[str] = Counter()
    producer = CountingProducer(settings)
    total = 3000
    for i, event in enumerate(itertools.islice(simulator.events(), total)):
        source = by_name[event.source]
        if i % 10 == 0:
            value, reason, bad_field = corrupt(rng, source, event.payload)
            expected_reasons[reason.value] += 1
            expected_dead[value] = (reason.value, bad_field)
        else:
            value = orjson.dumps(event.payload)
            good[source.name] += 1
        producer.produce(source.raw_topic, value, event.key, event.event_time_ms)
    assert producer.flush().delivered == total

    counts = run_ingest(settings, sources, group_id=f"{tag}-ingest", idle_timeout_s=3)
    assert counts.received == total
    assert counts.balanced()
    assert counts.dead_lettered == sum(expected_reasons.values())
    assert dict(counts.by_reason) == dict(expected_reasons)

    records = read_topics(settings, [s.topic for s in sources])
    valid_records = [m for m in records if not is_heartbeat(m.headers())]
    assert len(valid_records) == counts.valid == sum(good.values())
    # Idle for 3 s at the end, ingest wrote heartbeats to every partition of the event topics:
    # no key, no value, stamps that never go back, and the last record of each partition is a
    # heartbeat stamped at or after its newest event (event time moves on with the wall clock).
    heartbeats = [m for m in records if is_heartbeat(m.headers())]
    assert len(heartbeats) == counts.heartbeats
    by_partition: dict[tuple[str, int], list[Message]] = {}
    for msg in sorted(records, key=lambda m: m.offset() or 0):
        by_partition.setdefault((str(msg.topic()), msg.partition() or 0), []).append(msg)
    assert set(by_partition) == {
        (s.topic, p) for s in sources for p in range(settings.topic_partitions)
    }
    for where, msgs in by_partition.items():
        beats = [m for m in msgs if is_heartbeat(m.headers())]
        assert all((m.key(), m.value()) == (None, b"") for m in beats)
        stamps = [m.timestamp()[1] for m in beats]
        assert stamps == sorted(stamps), where
        assert is_heartbeat(msgs[-1].headers()), where
        # No event of the backlog follows a heartbeat stamped more than its source's lateness
        # after it (it would be late for the stream).
        lateness_ms = int(by_name[where[0].split(".")[-1]].allowed_lateness.total_seconds() * 1000)
        stamped = 0
        for msg in msgs:
            if is_heartbeat(msg.headers()):
                stamped = max(stamped, msg.timestamp()[1])
            else:
                assert msg.timestamp()[1] >= stamped - lateness_ms, (where, msg.offset())
        assert stamps[-1] >= max(m.timestamp()[1] for m in msgs), where
    assert Counter(str(m.topic()).split(".")[-1] for m in valid_records) == good
    for msg in valid_records:
        source = by_name[str(msg.topic()).split(".")[-1]]
        values = orjson.loads(msg.value() or b"")
        assert msg.key() == values[source.key_field].encode()
        assert msg.timestamp()[1] == values[source.event_time_field]

    dead = read_topics(settings, [settings.dead_letter_topic])
    assert len(dead) == counts.dead_lettered
    for msg in dead:
        letter = DeadLetter.from_headers(msg.headers())
        expected_reason, expected_field = expected_dead[msg.value() or b""]
        assert letter.reason == expected_reason
        assert letter.field == (expected_field or None)
        assert letter.source in by_name
        assert letter.source_topic == by_name[letter.source].raw_topic
        assert letter.view is None  # only the stream's late dead letters name a view

    # Offsets were committed: a second run with the same group finds nothing new.
    again = run_ingest(settings, sources, group_id=f"{tag}-ingest", idle_timeout_s=2)
    assert again.received == 0
