"""The validating ingest path: raw topics in, canonical event topics and a dead-letter topic out.

Producers publish JSON to each source's raw topic. Ingest validates every record against the
source's schema. A valid event is forwarded as canonical JSON to the source's topic, keyed by the
source key, with the Kafka timestamp set to the event time (engines read event time from there).
An invalid one goes to the dead-letter topic with its original bytes and key, and headers that
say why. Offsets are committed only after the broker acknowledged the outputs (at least once),
and every record is counted: received == valid + dead_lettered.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException

from core.kafka import CountingProducer, ensure_topics
from core.records import H_ERROR as H_ERROR
from core.records import H_FIELD as H_FIELD
from core.records import H_OFFSET as H_OFFSET
from core.records import H_PARTITION as H_PARTITION
from core.records import H_REASON as H_REASON
from core.records import H_SOURCE as H_SOURCE
from core.records import H_TOPIC as H_TOPIC
from core.records import DeadLetter, Headers
from core.settings import Settings
from events.errors import IngestError
from features.schema import EventSource
from features.validation import EventValidator, Rejection, RejectReason

log = logging.getLogger("sluice.ingest")
JOIN_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class OutRecord:
    topic: str
    key: bytes | None
    value: bytes
    timestamp_ms: int
    headers: Headers | None


@dataclass
class IngestCounts:
    received: int = 0
    valid: int = 0
    dead_lettered: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    by_source: Counter[str] = field(default_factory=Counter)
    # From the first record received to the last commit: throughput without group-join time.
    busy_seconds: float = 0.0

    def balanced(self) -> bool:
        return self.received == self.valid + self.dead_lettered


def dead_letter(
    rejection: Rejection,
    source: str,
    topic: str,
    partition: int,
    offset: int,
    view: str | None = None,
) -> DeadLetter:
    """The dead letter of a rejected event (its headers: core.records.DeadLetter)."""
    return DeadLetter(
        reason=rejection.reason.value,
        field=rejection.field,
        error=rejection.describe(),
        source=source,
        source_topic=topic,
        partition=partition,
        offset=offset,
        view=view,
    )


class IngestRouter:
    """Kafka-free core of ingest: decides where each raw record goes, and counts."""

    def __init__(self, sources: Sequence[EventSource], dead_letter_topic: str) -> None:
        self._by_raw_topic = {s.raw_topic: (s, EventValidator(s)) for s in sources}
        self.dead_letter_topic = dead_letter_topic
        self.counts = IngestCounts()

    @property
    def raw_topics(self) -> list[str]:
        return sorted(self._by_raw_topic)

    def route(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        partition: int = -1,
        offset: int = -1,
        now_ms: int | None = None,
    ) -> OutRecord:
        source, validator = self._by_raw_topic[topic]
        self.counts.received += 1
        self.counts.by_source[source.name] += 1
        outcome = (
            validator.validate(value, now_ms)
            if value is not None
            else Rejection(RejectReason.INVALID_JSON, None, "record has no value (tombstone)")
        )
        if isinstance(outcome, Rejection):
            self.counts.dead_lettered += 1
            self.counts.by_reason[outcome.reason.value] += 1
            return OutRecord(
                topic=self.dead_letter_topic,
                key=key,
                value=value or b"",
                timestamp_ms=0,
                headers=dead_letter(outcome, source.name, topic, partition, offset).to_headers(),
            )
        self.counts.valid += 1
        return OutRecord(
            topic=source.topic,
            key=outcome.key.encode(),
            value=outcome.to_json(),
            timestamp_ms=outcome.event_time_ms,
            headers=None,
        )


def output_topics(sources: Sequence[EventSource], settings: Settings) -> list[str]:
    return (
        [s.topic for s in sources] + [s.raw_topic for s in sources] + [settings.dead_letter_topic]
    )


def run_ingest(
    settings: Settings,
    sources: Sequence[EventSource],
    *,
    group_id: str = "sluice-ingest",
    idle_timeout_s: float = 5.0,
    max_events: int | None = None,
    commit_every: int = 50_000,
    on_progress: Callable[[IngestCounts], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> IngestCounts:
    """Consume the sources' raw topics until idle for idle_timeout_s (or max_events, or stop).

    Bounded by idleness rather than end offsets because a broker's high watermark is not a
    reliable "end" while producers are active (and Tansu reports it approximately).
    """
    router = IngestRouter(sources, settings.dead_letter_topic)
    ensure_topics(settings, output_topics(sources, settings))
    consumer = Consumer(
        settings.kafka_client_config(
            **{
                "group.id": group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": 6000,
            }
        )
    )
    producer = CountingProducer(settings)
    # The idle clock starts at partition assignment: joining a new group can take seconds.
    assigned_at: list[float] = []
    consumer.subscribe(
        router.raw_topics, on_assign=lambda _c, _p: assigned_at.append(time.monotonic())
    )
    join_deadline = time.monotonic() + JOIN_TIMEOUT_S
    last_message_at = first_record_at = 0.0
    since_commit = 0
    try:
        while not should_stop():
            budget = 1000 if max_events is None else min(1000, max_events - router.counts.received)
            if budget <= 0:
                break
            batch = consumer.consume(num_messages=budget, timeout=0.2)
            if not batch:
                now = time.monotonic()
                if not assigned_at:
                    if now > join_deadline:
                        raise IngestError(
                            f"no partitions assigned to group {group_id!r} within "
                            f"{JOIN_TIMEOUT_S:.0f} s; is {settings.kafka_bootstrap} a broker?"
                        )
                    continue
                if now - max(last_message_at, assigned_at[0]) > idle_timeout_s:
                    break
                continue
            last_message_at = time.monotonic()
            first_record_at = first_record_at or last_message_at
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaException(err)
                out = router.route(
                    msg.topic() or "",
                    msg.value(),
                    msg.key(),
                    msg.partition() or 0,
                    msg.offset() or 0,
                )
                producer.produce(out.topic, out.value, out.key, out.timestamp_ms, out.headers)
            producer.poll(0)
            since_commit += len(batch)
            if since_commit >= commit_every:
                _commit(producer, consumer)
                since_commit = 0
            if on_progress is not None:
                on_progress(router.counts)
        _commit(producer, consumer)
        if first_record_at:
            router.counts.busy_seconds = time.monotonic() - first_record_at
    finally:
        consumer.close()
    log.info(
        "ingest finished",
        extra={
            "received": router.counts.received,
            "valid": router.counts.valid,
            "dead_lettered": router.counts.dead_lettered,
        },
    )
    return router.counts


def _commit(producer: CountingProducer, consumer: Consumer) -> None:
    # Outputs first, offsets second: a crash in between re-delivers, it never loses.
    producer.flush()
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError._NO_OFFSET:
            raise
