"""`sluice archive`: the events topics become the batch history, exactly once.

A long-running consumer of every ``events.<source>`` topic and of the dead-letter topic writes
the parquet history that Spark reads (layout and readers: events/history.py), so that both
engines read the same events. Exactly once across restarts and ``kill -9``, because the
offsets are stored with the data and nowhere else:

- Records are buffered per (topic, partition). A flush covers the offsets ``first..last`` read
  since the previous flush and writes one part per directory it has rows for: a source's UTC
  day of event time, or the late marks of a source. Each part is written to a dot-temp file
  (readers skip dot-files) and renamed; its name and its parquet metadata say (topic,
  partition, first, last, part i of n).
- At start the archiver undoes what a kill left half done (dot-temp files; a flush with fewer
  than n parts is deleted, so its range is read again), takes the next offset of each
  partition as the largest ``last`` + 1 of its parts and seeks there with ``assign()``. The
  group's committed offsets are never used (nor written).
- A flush whose records wrote no row (only skipped dead letters) leaves a zero-row part under
  ``_archive/progress/`` so that a restart does not read them again; each replaces the last.

Dead letters: reason ``late`` (the stream, streaming/sinks.py) is a mark (view, topic,
partition, offset, event id) under ``_late/<source>/``, so that the batch engine can leave out
for a view exactly the events the stream did not count. Other reasons are invalid input, not
events: skipped and counted. An event value that is not canonical JSON of its source is
skipped and counted too (ingest never writes one), and so are ingest's heartbeats (reason
``heartbeat``: no event, never parsed). Every run reports
``consumed = archived + late marks + skipped``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from core.errors import RecordError
from core.kafka import ensure_topics
from core.records import DeadLetter, is_heartbeat
from core.settings import Settings
from events.errors import ArchiveError, ArchiveLockedError, ArchiveOffsetError
from events.history import (
    ARCHIVE_DIR,
    DAY_MS,
    LATE_DIR,
    LATE_SCHEMA,
    PROGRESS_DIR,
    PartName,
    Recovery,
    archive_schema,
    late_dir,
    parse_events,
    parse_part_name,
    partition_dir,
    recover,
)
from events.identity import event_id
from features.schema import EventSource

log = logging.getLogger("sluice.archive")
GROUP_ID = "sluice-archive"  # librdkafka wants one; nothing is committed to it
REFRESH_PARTITIONS_S = 10.0  # how often new partitions of the topics are looked for
# Headers as confluent-kafka hands them back.
RecordHeaders = list[tuple[str, str | bytes | None]] | dict[str, str | bytes | None] | None


@dataclass
class ArchiveCounts:
    consumed: int = 0
    archived: int = 0
    late_marks: int = 0
    skipped: int = 0
    parts: int = 0
    by_source: Counter[str] = field(default_factory=Counter)
    skipped_by_reason: Counter[str] = field(default_factory=Counter)
    resumed_partitions: int = 0  # partitions that continued from offsets found in the parts
    undone_parts: int = 0  # parts of flushes a kill left incomplete, deleted at start
    # From the first record to the last, plus the final flush: no start-up, no idle time.
    busy_seconds: float = 0.0

    @property
    def buffered(self) -> int:
        """Read but not yet flushed (0 once a run has ended)."""
        return self.consumed - self.archived - self.late_marks - self.skipped

    def balanced(self) -> bool:
        return self.buffered == 0


@dataclass
class _Pending:
    """What one (topic, partition) read since its last flush."""

    first: int
    started: float  # monotonic time of the first record
    last: int = -1
    records: int = 0
    values: list[bytes] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    arrivals: list[int] = field(default_factory=list)
    marks: dict[str, list[dict[str, object]]] = field(default_factory=dict)  # dead letters
    skipped: Counter[str] = field(default_factory=Counter)


@contextmanager
def archive_lock(root: Path) -> Iterator[None]:
    """Hold ``<root>/_archive/.lock``: one archiver per history directory."""
    directory = root / ARCHIVE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArchiveLockedError(
                f"another `sluice archive` writes {root} (it holds {directory / '.lock'}); "
                "stop it first"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- the writer: records in, parts out ---------------------------------------------------------


class ArchiveWriter:
    """Kafka-free core of the archiver: buffers records per (topic, partition), writes flushes.

    ``add`` takes what a consumed record carries; a partition is flushed when it holds
    ``flush_records`` records or its oldest is ``flush_seconds`` old (``flush_due``), and
    everything by ``flush_all``.
    """

    def __init__(
        self,
        root: Path,
        sources: Sequence[EventSource],
        dead_letter_topic: str,
        *,
        flush_records: int = 10_000,
        flush_seconds: float = 5.0,
        fsync: bool = True,
    ) -> None:
        if flush_records < 1 or flush_seconds <= 0:
            raise ValueError("flush_records must be >= 1 and flush_seconds > 0")
        self.root = root
        self.by_topic = {s.topic: s for s in sources}
        self.dead_letter_topic = dead_letter_topic
        self.flush_records = flush_records
        self.flush_seconds = flush_seconds
        self.fsync = fsync
        self.pending: dict[tuple[str, int], _Pending] = {}
        self.counts = ArchiveCounts()

    def add(
        self,
        topic: str,
        partition: int,
        offset: int,
        value: bytes | None,
        headers: RecordHeaders,
        arrival_ms: int,
        now: float,
    ) -> None:
        self.counts.consumed += 1
        key = (topic, partition)
        pending = self.pending.get(key)
        if pending is None:
            pending = self.pending[key] = _Pending(first=offset, started=now)
        pending.last = offset
        pending.records += 1
        if topic == self.dead_letter_topic:
            self._dead_letter(pending, value or b"", headers)
        elif is_heartbeat(headers):  # ingest's, not an event: counted apart, never parsed
            pending.skipped["heartbeat"] += 1
        elif value is None:
            pending.skipped["no_value"] += 1
        else:
            pending.values.append(value)
            pending.offsets.append(offset)
            pending.arrivals.append(arrival_ms)
        if pending.records >= self.flush_records:
            self.flush(key)

    def _dead_letter(self, pending: _Pending, value: bytes, headers: RecordHeaders) -> None:
        try:
            letter = DeadLetter.from_headers(headers)
        except RecordError:
            pending.skipped["unreadable_dead_letter"] += 1
            return
        if letter.reason != "late":
            pending.skipped[letter.reason] += 1
            return
        # The source names a directory: take only names a definition could have.
        if letter.view is None or not letter.source.isidentifier() or letter.source[0] == "_":
            pending.skipped["unreadable_dead_letter"] += 1
            return
        pending.marks.setdefault(letter.source, []).append(
            {
                "view": letter.view,
                "topic": letter.source_topic,
                "partition": letter.partition,
                "offset": letter.offset,
                "event_id": event_id(value),
            }
        )

    def flush_due(self, now: float) -> None:
        for key, pending in list(self.pending.items()):
            if now - pending.started >= self.flush_seconds:
                self.flush(key)

    def flush_all(self) -> None:
        for key in list(self.pending):
            self.flush(key)

    def flush(self, key: tuple[str, int]) -> None:
        pending = self.pending.pop(key, None)
        if pending is None:
            return
        topic, partition = key
        if topic == self.dead_letter_topic:
            outputs = [
                (late_dir(self.root, source), pa.Table.from_pylist(rows, LATE_SCHEMA))
                for source, rows in sorted(pending.marks.items())
            ]
        else:
            outputs = self._event_parts(self.by_topic[topic], key, pending)
        self._write(PartName(topic, partition, pending.first, pending.last, 1, 1), outputs)
        counts = self.counts
        for directory, table in outputs:
            if directory.parent.name == LATE_DIR:
                counts.late_marks += table.num_rows
            else:
                counts.archived += table.num_rows
                counts.by_source[directory.parent.name] += table.num_rows
        skipped = pending.skipped.total()
        counts.skipped += skipped
        counts.skipped_by_reason.update(pending.skipped)
        if skipped:
            log.info(
                "records skipped",
                extra={"topic": topic, "partition": partition, "reasons": dict(pending.skipped)},
            )

    def _event_parts(
        self, source: EventSource, key: tuple[str, int], pending: _Pending
    ) -> list[tuple[Path, pa.Table]]:
        table, kept = parse_events(source, pending.values)
        bad = len(pending.values) - len(kept)
        if bad:
            pending.skipped["not_canonical"] += bad
            log.warning(
                "event values that are not canonical JSON of their source skipped",
                extra={"topic": key[0], "partition": key[1], "records": bad},
            )
        if table.num_rows == 0:
            return []
        take = pa.array(kept, pa.int64())
        values = pending.values if not bad else [pending.values[i] for i in kept]
        n = table.num_rows
        meta = [
            pa.array([key[0]] * n, pa.string()),
            pa.array([key[1]] * n, pa.int32()),
            pa.array(pending.offsets, pa.int64()).take(take),
            pa.array(pending.arrivals, pa.int64()).take(take),
            pa.array(list(map(event_id, values)), pa.string()),
        ]
        table = pa.Table.from_arrays([*table.columns, *meta], schema=archive_schema(source))
        stamp = table.column(source.event_time_field).cast(pa.int64())
        days = pc.floor(pc.divide(pc.cast(stamp, pa.float64()), float(DAY_MS))).cast(pa.int64())
        unique = sorted(pc.unique(days).to_pylist())
        if len(unique) == 1:
            return [(partition_dir(self.root, source, unique[0]), table)]
        return [
            (partition_dir(self.root, source, day), table.filter(pc.equal(days, day)))
            for day in unique
        ]

    def _write(self, flush: PartName, outputs: list[tuple[Path, pa.Table]]) -> None:
        """Write one flush's parts, each to a dot-temp file renamed into place."""
        progress = not outputs
        if progress:
            outputs = [(self.root / ARCHIVE_DIR / PROGRESS_DIR, LATE_SCHEMA.empty_table())]
        count = len(outputs)
        for index, (directory, table) in enumerate(outputs, start=1):
            name = PartName(flush.topic, flush.partition, flush.first, flush.last, index, count)
            directory.mkdir(parents=True, exist_ok=True)
            final = directory / name.file_name()
            temporary = directory / f".{final.name}.tmp"
            with open(temporary, "wb") as handle:
                pq.write_table(table.replace_schema_metadata(name.metadata(table.num_rows)), handle)
                if self.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(temporary, final)
            if self.fsync:
                _fsync_dir(directory)
            self.counts.parts += 1
            if progress:
                _drop_older_progress(directory, name)
        log.debug("flushed", extra={"topic": flush.topic, "flush": flush.flush})


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_older_progress(directory: Path, newest: PartName) -> None:
    """A progress part supersedes the older ones of its partition (the newest holds the max)."""
    for path in directory.glob("part-*.parquet"):
        part = parse_part_name(path.name)
        if (
            part is not None
            and (part.topic, part.partition) == (newest.topic, newest.partition)
            and part.last < newest.last
        ):
            path.unlink(missing_ok=True)


# -- the consumer ------------------------------------------------------------------------------


def run_archive(
    settings: Settings,
    sources: Sequence[EventSource],
    *,
    flush_records: int = 10_000,
    flush_seconds: float = 5.0,
    idle_timeout_s: float | None = None,
    max_events: int | None = None,
    fsync: bool = True,
    on_progress: Callable[[ArchiveCounts], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> ArchiveCounts:
    """Archive the sources' events topics and the dead-letter topic into settings.history_dir.

    Runs until ``should_stop()``, ``max_events`` records, or ``idle_timeout_s`` seconds without
    a record (None: no idle limit); then flushes everything read and returns the counts.
    """
    root = settings.history_dir
    topics = [s.topic for s in sources] + [settings.dead_letter_topic]
    ensure_topics(settings, topics)
    root.mkdir(parents=True, exist_ok=True)
    pa.array([0])  # pyarrow imports pandas at its first conversion (~1 s): not in a flush
    with archive_lock(root):
        recovery = recover(root)
        writer = ArchiveWriter(
            root,
            sources,
            settings.dead_letter_topic,
            flush_records=flush_records,
            flush_seconds=flush_seconds,
            fsync=fsync,
        )
        counts = writer.counts
        counts.undone_parts = len(recovery.undone)
        consumer = Consumer(
            settings.kafka_client_config(
                **{
                    "group.id": GROUP_ID,
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    # An offset the broker no longer holds is an error, never a silent jump.
                    "auto.offset.reset": "error",
                }
            )
        )
        try:
            assigned: set[tuple[str, int]] = set()
            _assign_new(consumer, topics, recovery.next_offsets, assigned)
            counts.resumed_partitions = len(assigned & set(recovery.next_offsets))
            log.info(
                "archive started",
                extra={
                    "root": str(root),
                    "partitions": len(assigned),
                    "resumed": counts.resumed_partitions,
                    "undone_parts": counts.undone_parts,
                },
            )
            _consume(
                consumer,
                writer,
                topics,
                recovery,
                assigned,
                idle_timeout_s,
                max_events,
                on_progress,
                should_stop,
            )
        finally:
            consumer.close()
    facts = ("consumed", "archived", "late_marks", "skipped", "parts", "busy_seconds")
    log.info("archive finished", extra={name: getattr(counts, name) for name in facts})
    return counts


def _consume(
    consumer: Consumer,
    writer: ArchiveWriter,
    topics: list[str],
    recovery: Recovery,
    assigned: set[tuple[str, int]],
    idle_timeout_s: float | None,
    max_events: int | None,
    on_progress: Callable[[ArchiveCounts], None] | None,
    should_stop: Callable[[], bool],
) -> None:
    counts = writer.counts
    last_record = time.monotonic()
    first_record = 0.0
    refresh_at = last_record + REFRESH_PARTITIONS_S
    while not should_stop():
        budget = 1000 if max_events is None else min(1000, max_events - counts.consumed)
        if budget <= 0:
            break
        batch = consumer.consume(num_messages=budget, timeout=0.2)
        now = time.monotonic()
        if batch:
            arrival_ms = time.time_ns() // 1_000_000
            add = writer.add
            for msg in batch:
                err = msg.error()
                if err is not None:
                    _consumer_error(err, msg.topic(), msg.partition())
                    continue
                add(
                    msg.topic() or "",
                    msg.partition() or 0,
                    msg.offset() or 0,
                    msg.value(),
                    msg.headers(),
                    arrival_ms,
                    now,
                )
            last_record = now
            first_record = first_record or now
        elif idle_timeout_s is not None and now - last_record > idle_timeout_s:
            break
        writer.flush_due(now)
        if now >= refresh_at:
            _assign_new(consumer, topics, recovery.next_offsets, assigned)
            refresh_at = now + REFRESH_PARTITIONS_S
        if on_progress is not None:
            on_progress(counts)
    flushed_at = time.monotonic()
    writer.flush_all()
    if first_record:  # reading and writing, not the idle wait at the end
        counts.busy_seconds = last_record - first_record + time.monotonic() - flushed_at
    if on_progress is not None:
        on_progress(counts)


def _assign_new(
    consumer: Consumer,
    topics: list[str],
    next_offsets: dict[tuple[str, int], int],
    assigned: set[tuple[str, int]],
) -> None:
    """Assign partitions not assigned yet, each at its stored next offset (or the beginning)."""
    try:
        metadata = consumer.list_topics(timeout=10)
    except Exception as exc:  # KafkaException; at start the topics were just ensured
        log.warning("partition refresh failed", extra={"error": str(exc)})
        return
    new = []
    for topic in topics:
        described = metadata.topics.get(topic)
        if described is None or described.error is not None:
            continue
        for partition in sorted(described.partitions):
            if (topic, partition) not in assigned:
                offset = next_offsets.get((topic, partition), OFFSET_BEGINNING)
                new.append(TopicPartition(topic, partition, offset))
    if new:
        consumer.incremental_assign(new)
        assigned.update((tp.topic, tp.partition) for tp in new)
        log.info(
            "partitions assigned",
            extra={"partitions": [f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in new]},
        )


def _consumer_error(err: KafkaError, topic: str | None, partition: int | None) -> None:
    code = err.code()
    if code == KafkaError._PARTITION_EOF:
        return
    if code in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE):
        raise ArchiveOffsetError(
            f"{topic}[{partition}]: the offset the archive resumes at is no longer in the topic "
            f"({err.str()}): records were deleted (retention) or the topic was recreated before "
            "they were archived. Archive into a new history directory, or move the parts of "
            f"{topic} away to start that topic from its beginning"
        )
    # Negative codes are the client's own (broker down, timeouts): librdkafka retries them.
    if err.fatal() or (code >= 0 and not err.retriable()):
        raise ArchiveError(f"{topic}[{partition}]: {err.str()}")
    log.warning("consumer error, retrying", extra={"error": err.str()})
