"""The driver's view of a running job: counts from the stats topic, lag from the broker.

Operators report cumulative counters to STATS_TOPIC (sinks.StatsReporter: core.records
StreamStats records); the newest record per operator instance wins. A run's counts start
from zero with each start of the job, from a checkpoint too (after a failover they cover the
replay). The tile engine's counters are also state: its records name the counts of the
snapshot a run restored from (``restored``), and ViewReport.cumulative() adds them: the job's
totals over every run. The event engine's records do not (ViewReport.restored is None).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, TopicPartition

from core.records import is_heartbeat
from core.settings import Settings
from core.stream_stats import PrepareCounts, PublishCounts, StreamStats, WindowCounts
from streaming.errors import StreamJobError
from streaming.sinks import STATS_TOPIC


@dataclass
class ViewReport:
    """What one view's pipeline did in this run."""

    events: int = 0  # events read from the source topic (heartbeats are not events)
    aggregated: int = 0  # events added to windows
    filtered: int = 0  # dropped by the view's filter (processed, not lost)
    late: int = 0  # dead-lettered with reason "late"
    rejected: int = 0  # dead-lettered for another reason (a producer bypassed ingest)
    duplicates: int = 0  # repeats of an event already counted in its window (same event id)
    # Tile engine: read, tile not closed at the report (carried to the next run by a
    # snapshot); negative when the run closed more tiles restored from a snapshot than it
    # left open. Always 0 for the event engine and at the end of a bounded run.
    open: int = 0
    heartbeats: int = 0  # ingest's heartbeat records read and dropped
    rows: int = 0  # rows emitted (features topic)
    online_written: int = 0
    online_skipped_older: int = 0
    busy_s: float = 0.0  # first to last record read
    first_record_at_ms: int | None = None  # wall clock, when the first record was read
    last_report_at_ms: int | None = None  # wall clock, newest operator report (final: closed)
    watermark: int | None = None  # of the newest rows emitted
    max_end_ms: int | None = None
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset to read
    lag: int | None = None  # records in the topic not read yet (approximate on Tansu)
    # Counters (core/stream_stats.CARRIED) of the snapshot this run restored from, summed over
    # the instances that carry them; None: the engine does not carry counters across runs.
    restored: dict[str, int] | None = None

    def cumulative(self) -> ViewReport:
        """The job's totals over every run: this run's counters plus the restored ones (this
        run's alone when nothing was restored)."""
        restored = self.restored or {}
        changes = {name: getattr(self, name) + n for name, n in restored.items()}
        return dataclasses.replace(self, restored=None, **changes)

    def balanced(self) -> bool:
        """Every event read was aggregated, filtered, dead-lettered or a duplicate, or waits in
        an open tile (``open``; events a restored snapshot carried in count as negative)."""
        processed = self.aggregated + self.filtered + self.late + self.rejected + self.duplicates
        return self.events == processed + self.open


@dataclass
class StreamReport:
    views: dict[str, ViewReport]
    status: str  # FINISHED (bounded run), STOPPED (savepoint taken), CANCELED
    seconds: float
    savepoint: str | None = None

    def balanced(self) -> bool:
        return all(v.balanced() for v in self.views.values())


class StatsBoard:
    """Follows STATS_TOPIC for one run and keeps the newest record per operator instance."""

    def __init__(self, settings: Settings, run_id: str) -> None:
        self.run_id = run_id
        # assign(), not subscribe(): no group join to wait for, nothing committed.
        self._consumer = Consumer(
            settings.kafka_client_config(
                **{"group.id": f"sluice-stream-monitor-{run_id}", "enable.auto.commit": False}
            )
        )
        metadata = self._consumer.list_topics(STATS_TOPIC, timeout=10)
        partitions = metadata.topics[STATS_TOPIC].partitions
        # OFFSET_END may resolve a little early on Tansu; older runs' records are skipped.
        self._consumer.assign([TopicPartition(STATS_TOPIC, p, OFFSET_END) for p in partitions])
        self.latest: dict[tuple[str, str, int], StreamStats] = {}

    def poll(self, timeout_s: float = 0.2) -> None:
        for msg in self._consumer.consume(1000, timeout=timeout_s):
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise StreamJobError(f"reading {STATS_TOPIC}: {error}")
            record = StreamStats.decode(msg.value())
            if record.run != self.run_id:
                continue
            held = self.latest.get(record.instance)
            if held is None or (record.final, record.at_ms) >= (held.final, held.at_ms):
                self.latest[record.instance] = record

    def finals(self) -> int:
        return sum(1 for r in self.latest.values() if r.final)

    def report(self, views: list[str], topics: dict[str, str]) -> dict[str, ViewReport]:
        out = {name: ViewReport() for name in views}
        for record in self.latest.values():
            if record.view not in out:
                continue
            v = out[record.view]
            v.last_report_at_ms = _max(v.last_report_at_ms, record.at_ms)
            c = record.counts
            if record.restored is not None:
                restored = v.restored or {}
                for name, n in record.restored.items():
                    restored[name] = restored.get(name, 0) + n
                v.restored = restored
            if isinstance(c, PrepareCounts):
                v.events += c.events
                v.late += c.late
                v.filtered += c.filtered
                v.rejected += c.rejected
                v.heartbeats += c.heartbeats
                if c.first_at_ms:
                    v.busy_s = max(v.busy_s, (c.last_at_ms - c.first_at_ms) / 1000)
                    v.first_record_at_ms = _min(v.first_record_at_ms, c.first_at_ms)
                v.offsets |= c.offsets
            elif isinstance(c, WindowCounts):
                v.aggregated += c.aggregated
                v.duplicates += c.duplicates
                v.open += c.open
            elif isinstance(c, PublishCounts):
                v.rows += c.rows
                v.online_written += c.online_written
                v.online_skipped_older += c.online_skipped_older
                v.max_end_ms = _max(v.max_end_ms, c.max_end_ms)
                # The watermark that fired the newest rows. (Prepare sees the watermark only
                # as it stood at its last event, so it lags whenever input pauses.)
                v.watermark = _max(v.watermark, c.watermark)
        for name, v in out.items():
            v.lag = self.lag(topics[name], v.offsets)
        return out

    def lag(self, topic: str, offsets: dict[int, int]) -> int | None:
        try:
            metadata = self._consumer.list_topics(topic, timeout=2)
            total = 0
            for p in metadata.topics[topic].partitions:
                low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=2, cached=False
                )
                total += max(0, high - max(low, offsets.get(p, low)))
            return total
        except Exception:  # a monitoring read must never stop the job
            return None

    def close(self) -> None:
        self._consumer.close()


def _min(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def stop_offsets_before(
    settings: Settings, topic: str, until_ms: int, idle_s: float = 2.0
) -> dict[int, int]:
    """Per partition, the offset of its first record stamped at or after until_ms, or the
    offset after its last record when it has none: where a run bounded by time stops.

    Scans the topic: offsets_for_times would do it in one request on Apache Kafka, but Tansu
    answers 0 for every time. The end is found by idleness, since Tansu's high watermark lags.
    Heartbeats never mark the stop (their time says how long ingest waited, not what events
    came): they are read, and dropped, like records before the stop.
    """
    consumer = Consumer(
        settings.kafka_client_config(
            **{"group.id": f"sluice-stream-scan-{time.time_ns()}", "enable.auto.commit": False}
        )
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        if not partitions:
            raise StreamJobError(f"topic {topic!r} does not exist")
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        found: dict[int, int] = {}
        after_last = dict.fromkeys(partitions, 0)
        last_record = time.monotonic()
        while len(found) < len(partitions) and time.monotonic() - last_record < idle_s:
            batch = consumer.consume(5000, timeout=0.2)
            for msg in batch:
                p, offset = msg.partition(), msg.offset()
                if msg.error() is not None or p in found or p is None or offset is None:
                    continue
                last_record = time.monotonic()
                if msg.timestamp()[1] >= until_ms and not is_heartbeat(msg.headers()):
                    found[p] = offset
                    consumer.pause([TopicPartition(topic, p)])
                else:
                    after_last[p] = offset + 1
        return {p: found.get(p, after_last[p]) for p in partitions}
    finally:
        consumer.close()
