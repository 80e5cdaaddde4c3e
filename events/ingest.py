"""The validating ingest path: raw topics in, canonical event topics and a dead-letter topic out.

Producers publish JSON to each source's raw topic. Ingest validates every record against the
source's schema. A valid event is forwarded as canonical JSON to the source's topic, keyed by the
source key, with the Kafka timestamp set to the event time (engines read event time from there).
An invalid one goes to the dead-letter topic with its original bytes and key (a too_large one:
its first TOO_LARGE_PREFIX_BYTES), and headers that say why. Offsets are committed only after
the broker acknowledged the outputs (at least once),
and every record is counted: received == valid + dead_lettered.

Heartbeats (settings.ingest_heartbeat_ms; 0 disables): a partition of ``events.<source>`` that
had no record for that long gets a heartbeat record (explicit partition, no key, empty value,
header ``sluice.kind: heartbeat``, see core.records.is_heartbeat) stamped with the newest event
time forwarded to that partition plus the wall time elapsed since it was delivered (a partition
this run has not written yet takes the newest such time of its topic). Live, that is about now;
after a fast replay it moves on with the wall clock. The stream's per-partition watermark
follows record timestamps, so quiet partitions, and a wholly quiet topic, stop holding windows
open. Which partition an event landed on is learnt from its delivery report (the keyed
partitioner decides). Heartbeats are not events: they are counted apart (``heartbeats``) and
every reader of an events topic skips them. A heartbeat asserts that the partition's event time
has moved on: an event forwarded later with an event time more than the source's
allowed_lateness behind it is late for the stream. Ingest writes heartbeats only while it runs,
and never stamps one ahead of a raw partition it has not read to its end (RawProgress): a
backlog's events are never late because of a heartbeat.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from core.kafka import CountingProducer, ensure_topics
from core.records import H_ERROR as H_ERROR
from core.records import H_FIELD as H_FIELD
from core.records import H_OFFSET as H_OFFSET
from core.records import H_PARTITION as H_PARTITION
from core.records import H_REASON as H_REASON
from core.records import H_SOURCE as H_SOURCE
from core.records import H_TOPIC as H_TOPIC
from core.records import HEARTBEAT_HEADERS, HEARTBEAT_VALUE, DeadLetter, Headers
from core.settings import Settings
from events.errors import IngestError
from features.schema import EventSource
from features.validation import MAX_EVENT_BYTES, EventValidator, Rejection, RejectReason

log = logging.getLogger("sluice.ingest")
_EOF = KafkaError._PARTITION_EOF
NO_CAP = 2**62  # a heartbeat stamp without a bound (ms)
JOIN_TIMEOUT_S = 60.0
# A poll holds its whole batch in memory (librdkafka's prefetch limit does not bound a batch:
# measured 35 MiB in one poll with a 4 MiB queue). So a poll asks for few records at first and
# doubles up to POLL_RECORDS while records stay small: a batch holds about POLL_BYTES, or one
# batch of the previous size when records suddenly grow.
POLL_RECORDS = 1000
POLL_FIRST = 16
POLL_BYTES = 8 << 20
# A too_large event's dead letter keeps only this prefix of its bytes: the whole may not fit in
# a record; its headers name the raw topic, partition and offset where it stays in full.
TOO_LARGE_PREFIX_BYTES = 4096


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
    # Heartbeat records written to quiet partitions of the event topics (not events).
    heartbeats: int = 0

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

    def __init__(
        self,
        sources: Sequence[EventSource],
        dead_letter_topic: str,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        self._by_raw_topic = {s.raw_topic: (s, EventValidator(s, max_event_bytes)) for s in sources}
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
            kept = value or b""
            if outcome.reason is RejectReason.TOO_LARGE:
                kept = kept[:TOO_LARGE_PREFIX_BYTES]
            return OutRecord(
                topic=self.dead_letter_topic,
                key=key,
                value=kept,
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


def monotonic_ms() -> float:
    return time.monotonic() * 1000


@dataclass(slots=True)
class _PartitionClock:
    event_ms: int | None = None  # newest event time delivered to the partition
    event_at: float = 0.0  # monotonic ms of the newest delivery to it
    written_at: float | None = None  # monotonic ms of its newest record (event or heartbeat)
    last_heartbeat_ms: int | None = None


class HeartbeatClock:
    """Kafka-free core of heartbeats: per output partition, when it last got a record and the
    event time it carries; which partitions are due a heartbeat, stamped with what.

    A partition's clock is its newest delivered event time plus the monotonic time elapsed since
    its newest delivery; a partition without a delivery in this run takes its topic's newest
    clock (nothing is due on a topic before its first delivery). Stamps never go backwards.
    """

    def __init__(
        self,
        partitions: Mapping[str, int],
        interval_ms: int,
        now_ms: Callable[[], float] = monotonic_ms,
    ) -> None:
        self.interval_ms = interval_ms
        self._now = now_ms
        start = now_ms()
        self._clocks = {
            topic: [_PartitionClock(written_at=start) for _ in range(count)]
            for topic, count in partitions.items()
        }

    def delivered(self, topic: str, partition: int, event_ms: int) -> None:
        """An event was acknowledged on (topic, partition) (other topics are ignored)."""
        clocks = self._clocks.get(topic)
        if clocks is None or not 0 <= partition < len(clocks):
            return
        clock = clocks[partition]
        now = self._now()
        if clock.event_ms is None or event_ms >= clock.event_ms:
            clock.event_ms = event_ms
        clock.event_at = now
        clock.written_at = now

    def _stamp(self, clock: _PartitionClock, now: float) -> int:
        return int(clock.event_ms or 0) + int(now - clock.event_at)

    def due(self, cap: int = NO_CAP) -> list[tuple[str, int, int]]:
        """(topic, partition, timestamp ms) of each heartbeat due now, stamped at most cap (a
        stamp no newer than the partition's last heartbeat is not due); marks them written."""
        if self.interval_ms <= 0:
            return []
        now = self._now()
        out: list[tuple[str, int, int]] = []
        for topic, clocks in self._clocks.items():
            known = [self._stamp(c, now) for c in clocks if c.event_ms is not None]
            if not known:
                continue
            topic_clock = max(known)
            for partition, clock in enumerate(clocks):
                if clock.written_at is not None and now - clock.written_at < self.interval_ms:
                    continue
                stamp = topic_clock if clock.event_ms is None else self._stamp(clock, now)
                stamp = min(stamp, cap)
                if clock.last_heartbeat_ms is not None and stamp <= clock.last_heartbeat_ms:
                    continue
                clock.last_heartbeat_ms = stamp
                clock.written_at = now
                out.append((topic, partition, stamp))
        return out


class RawProgress:
    """How far ingest has read each assigned raw partition, for the heartbeats' stamps.

    A partition is read to its end when librdkafka's partition EOF event
    (``enable.partition.eof``) came after its last record; until then its next records may be
    a backlog, no older (within the sources' lateness) than the newest event read from it. So
    a heartbeat may carry at most the oldest such newest time, and none may be written while a
    partition not read to its end has given no event in this run (it may hold a backlog of any
    age). A poll that returns fewer records than asked says nothing of this: the broker may
    serve one partition while others wait (Tansu fills a fetch from one partition before the
    next), and a loaded machine delays fetches.
    """

    def __init__(self) -> None:
        self._assigned: set[tuple[str, int]] | None = None
        self._at_end: set[tuple[str, int]] = set()
        self._newest: dict[tuple[str, int], int] = {}

    def assigned(self, partitions: Sequence[tuple[str, int]]) -> None:
        """A (re)balance assigned these partitions: none read to its end yet."""
        self._assigned = set(partitions)
        self._at_end.clear()
        self._newest.clear()

    def revoked(self) -> None:
        self._assigned = None

    def record(self, topic: str, partition: int, event_ms: int | None) -> None:
        """A record was read (event_ms: its event time; None: it was dead-lettered)."""
        where = (topic, partition)
        self._at_end.discard(where)
        if event_ms is not None and event_ms > self._newest.get(where, event_ms - 1):
            self._newest[where] = event_ms

    def end(self, topic: str, partition: int) -> None:
        self._at_end.add((topic, partition))

    def cap(self) -> int | None:
        """The newest stamp a heartbeat may carry now (None: no heartbeat may be written)."""
        if self._assigned is None:
            return None
        cap = NO_CAP
        for where in self._assigned - self._at_end:
            newest = self._newest.get(where)
            if newest is None:
                return None
            cap = min(cap, newest)
        return cap


class IngestProducer(CountingProducer):
    """The ingest's producer: reports where each forwarded event landed (its delivery report
    names the partition the keyed partitioner chose) and writes heartbeats to a partition."""

    def __init__(self, settings: Settings, clock: HeartbeatClock) -> None:
        super().__init__(settings)
        self._clock = clock

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        super()._on_delivery(err, msg)
        # Events are keyed; heartbeats are not (and dead letters go to another topic).
        if err is None and msg.key() is not None:
            self._clock.delivered(msg.topic() or "", msg.partition() or 0, msg.timestamp()[1])

    def heartbeat(self, topic: str, partition: int, timestamp_ms: int) -> None:
        while True:
            try:
                self._producer.produce(
                    topic,
                    value=HEARTBEAT_VALUE,
                    partition=partition,
                    timestamp=timestamp_ms,
                    headers=HEARTBEAT_HEADERS,
                )
                break
            except BufferError:
                self._producer.poll(0.05)
        self.counts.sent += 1


def _partition_counts(consumer: Consumer, topics: Sequence[str]) -> dict[str, int]:
    metadata = consumer.list_topics(timeout=10).topics
    return {t: len(metadata[t].partitions) for t in topics if t in metadata}


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
    reliable "end" while producers are active (and Tansu reports it approximately). An
    idle_timeout_s of 0 or less never stops on idleness (a live ingest: heartbeats go on).
    """
    router = IngestRouter(sources, settings.dead_letter_topic, settings.ingest_max_event_bytes)
    ensure_topics(settings, output_topics(sources, settings))
    consumer = Consumer(
        settings.kafka_client_config(
            **{
                "group.id": group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": 6000,
                # Prefetch about 16 MiB (librdkafka's default is 64 MiB): ~50k ordinary
                # events, and less memory when records are large.
                "queued.max.messages.kbytes": 16 * 1024,
                # End-of-partition events tell which raw partitions ingest has read (RawProgress).
                "enable.partition.eof": True,
            }
        )
    )
    clock = HeartbeatClock(
        _partition_counts(consumer, [s.topic for s in sources]), settings.ingest_heartbeat_ms
    )
    producer = IngestProducer(settings, clock)
    # Wait for records no longer than a heartbeat interval allows.
    wait_s = 0.2 if clock.interval_ms <= 0 else min(0.2, clock.interval_ms / 4000)
    # The idle clock starts at partition assignment: joining a new group can take seconds.
    assigned_at: list[float] = []
    progress = RawProgress()

    def on_assign(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assigned_at.append(time.monotonic())
        progress.assigned([(tp.topic, tp.partition) for tp in partitions])

    consumer.subscribe(
        router.raw_topics, on_assign=on_assign, on_revoke=lambda _c, _p: progress.revoked()
    )

    def beat() -> None:
        # After the batch was forwarded: a heartbeat is ordered after the events read before it.
        cap = progress.cap()
        if cap is not None:
            for topic, partition, stamp in clock.due(cap):
                producer.heartbeat(topic, partition, stamp)
                router.counts.heartbeats += 1

    join_deadline = time.monotonic() + JOIN_TIMEOUT_S
    last_message_at = first_record_at = 0.0
    since_commit = 0
    poll_records = POLL_FIRST
    try:
        while not should_stop():
            budget = poll_records
            if max_events is not None:
                budget = min(budget, max_events - router.counts.received)
            if budget <= 0:
                break
            batch = consumer.consume(num_messages=budget, timeout=wait_s)
            records = 0
            for msg in batch:  # in order: a partition's EOF event follows its last record
                topic, partition = msg.topic() or "", msg.partition() or 0
                err = msg.error()
                if err is not None:
                    if err.code() != _EOF:
                        raise KafkaException(err)
                    progress.end(topic, partition)
                    continue
                out = router.route(topic, msg.value(), msg.key(), partition, msg.offset() or 0)
                producer.produce(out.topic, out.value, out.key, out.timestamp_ms, out.headers)
                event = out.topic != router.dead_letter_topic
                progress.record(topic, partition, out.timestamp_ms if event else None)
                records += 1
            beat()
            if not records:
                producer.poll(0)  # delivery reports: where events landed
                now = time.monotonic()
                if not assigned_at:
                    if now > join_deadline:
                        raise IngestError(
                            f"no partitions assigned to group {group_id!r} within "
                            f"{JOIN_TIMEOUT_S:.0f} s; is {settings.kafka_bootstrap} a broker?"
                        )
                    continue
                if 0 < idle_timeout_s < now - max(last_message_at, assigned_at[0]):
                    break
                continue
            last_message_at = time.monotonic()
            first_record_at = first_record_at or last_message_at
            largest = max(len(msg) for msg in batch)  # len: the value's size, not copied
            poll_records = max(
                1, min(2 * poll_records, POLL_RECORDS, POLL_BYTES // max(largest, 1))
            )
            producer.poll(0)
            since_commit += records
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
            "heartbeats": router.counts.heartbeats,
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
