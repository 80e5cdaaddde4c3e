"""What the job's Python functions write: rows, dead letters and progress. No Flink here.

Every writer buffers and is flushed at the end of each PyFlink bundle (see functions.py). A
bundle ends before Flink lets a checkpoint barrier pass the Python operator, so everything the
job emitted before a checkpoint is acknowledged by Kafka and Redis before that checkpoint
completes: at least once, end to end. After a failure the job replays from the checkpoint;
features-topic records may repeat, online-store writes are idempotent per (entity, end).

Why not PyFlink's Java KafkaSink with a side output: it cannot write record headers, and the
dead-letter format (core.records.DeadLetter) carries its reasons in headers. One producer path
for ingest and stream keeps that format in one place. Every record written here is a
core.records type: FeatureRow, DeadLetter, StreamStats.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from core.kafka import CountingProducer
from core.records import FeatureRow
from core.settings import Settings
from core.stream_stats import PublishCounts, StageCounts, StreamStats
from events.ingest import dead_letter
from features.definitions import FeatureView
from features.validation import Rejection
from streaming.compile import features_topic

# One record per operator instance whenever its counts changed, plus a final one: the driver
# turns them into throughput, lag and the run's counts.
STATS_TOPIC = "sluice.stream-stats"


@dataclass(frozen=True)
class JobContext:
    """What every function of one run needs to reach the outside world (picklable)."""

    settings: Settings
    run_id: str


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class StatsReporter:
    """Cumulative counters of one operator instance (StreamStats), sent whenever they changed.

    Reports are sent at bundle ends only (there is no timer without input), so a report that
    was skipped would stay stale for as long as no more input arrives: each change is sent.
    Bundles end at most every bundle_time_ms, which bounds the rate.

    An engine that carries counters across runs names, once it knows them, the counters of the
    snapshot its run restored from (``restored``, core/stream_stats.py); they go with every
    later report of that kind of counts.
    """

    def __init__(
        self, producer: CountingProducer, ctx: JobContext, view: str, subtask: int
    ) -> None:
        self._producer = producer
        self._run = ctx.run_id
        self._view = view
        self._subtask = subtask
        # Per kind of counts: the last report (counters, final, restored) and restored ones.
        self._last: dict[type, tuple[dict[str, Any], bool, dict[str, int] | None]] = {}
        self._restored: dict[type, dict[str, int]] = {}

    def restored(self, kind: type, counters: dict[str, int]) -> None:
        """The run restored ``counters`` (CARRIED ones) of ``kind`` of counts from a snapshot."""
        self._restored[kind] = dict(counters)

    def report(self, counts: StageCounts, *, final: bool = False) -> None:
        restored = self._restored.get(type(counts))
        # A copy: the offsets dict changes in place.
        state = (dataclasses.asdict(counts), final, restored)
        if not final and self._last.get(type(counts)) == state:
            return
        self._last[type(counts)] = state
        record = StreamStats(
            self._run, self._view, self._subtask, counts, final, now_ms(), restored
        )
        key = f"{self._run}/{self._view}/{record.op}/{self._subtask}"
        self._producer.produce(STATS_TOPIC, record.encode(), key, record.at_ms)


class DeadLetters:
    """Dead-letter records of a view's source, in the ingest path's format."""

    def __init__(self, producer: CountingProducer, ctx: JobContext, view: FeatureView) -> None:
        self._producer = producer
        self._topic = ctx.settings.dead_letter_topic
        self._view = view

    def send(
        self, rejection: Rejection, raw: bytes, key: bytes | None, partition: int, offset: int
    ) -> None:
        source = self._view.source
        # Lateness depends on the view (its slide), so the view is named too.
        letter = dead_letter(
            rejection, source.name, source.topic, partition, offset, view=self._view.name
        )
        # Timestamp 0: the broker stamps the time of dead-lettering, as ingest does.
        self._producer.produce(self._topic, raw, key, 0, letter.to_headers())


END_OF_INPUT = 2**63 - 1  # Flink's watermark at the end of a bounded input


class RowPublisher:
    """Rows to the online store (newest per entity) and to the view's features topic, and the
    operator instance's progress (features/contract.py).

    Progress. Flink fires every timer at or before a watermark before it passes on anything
    that carries a later one; a window's row is emitted by the timer at its end. So once this
    operator has seen a watermark later than W, every row of a window ending at or before W is
    emitted; it is written at the bundle's end, and W is published after it (the settled
    watermark). The watermark the operator sees last is not settled yet: a bundle may end
    halfway through the timers it fires. At the end of a bounded input every timer has fired.
    """

    def __init__(
        self,
        producer: CountingProducer,
        ctx: JobContext,
        view: FeatureView,
        slot: tuple[int, int] = (0, 1),
    ) -> None:
        """``slot``: (subtask index, parallelism) of the operator instance."""
        from feature_repo.online_store import open_online_store

        self._slot = slot
        self._watermark = self._settled = -(2**63)
        self._published: int | None = None
        self._producer = producer
        self._view = view
        self._topic = features_topic(view.name)
        self._store = open_online_store(ctx.settings)
        # FeatureRow's encoding without building the object: one row per entity and window end.
        self._encode = FeatureRow.encode_row
        self._newest: dict[str, tuple[int, dict[str, Any]]] = {}
        self.counts = PublishCounts()

    def add(self, entity_key: str, window_end_ms: int, values: dict[str, Any]) -> None:
        record = self._encode(self._view.name, entity_key, window_end_ms, values, now_ms())
        self._producer.produce(self._topic, record, entity_key, window_end_ms)
        self.hold(entity_key, window_end_ms, values)

    def hold(
        self,
        entity_key: str,
        window_end_ms: int,
        values: dict[str, Any],
        rows: int = 1,
        fired_by: int | None = None,
    ) -> None:
        """A row for the online store, the newest of ``rows`` rows written to the features
        topic (by ``add``, or by the JVM: engine "tiles-java", where ``fired_by`` is the
        watermark that fired them; this operator sees it only after their rows)."""
        known = self.counts.watermark
        if fired_by is not None and (known is None or fired_by > known):
            # Statistics only ("the watermark that fired the newest rows"): progress waits
            # for the watermark itself (observe), since other shards' rows may still come.
            self.counts.watermark = fired_by
        # Rows of one key arrive oldest first. Within a bundle only the newest per entity
        # matters online: the store would refuse the older ones right after anyway.
        held = self._newest.get(entity_key)
        if held is None or held[0] <= window_end_ms:
            self._newest[entity_key] = (window_end_ms, values)
        self.counts.rows += rows
        if self.counts.max_end_ms is None or window_end_ms > self.counts.max_end_ms:
            self.counts.max_end_ms = window_end_ms

    def observe(self, watermark: int) -> None:
        """The operator saw ``watermark`` (with an element or a timer)."""
        if watermark > self._watermark:
            self._settled, self._watermark = self._watermark, watermark
        if self.counts.watermark is None or watermark > self.counts.watermark:
            self.counts.watermark = watermark

    def flush(self, final: bool = False) -> None:
        """Write the held rows, then the progress they complete; raise (failing the bundle, so
        Flink retries) if anything fails. ``final``: the operator closes."""
        if self._newest:
            from feature_repo.online_store import OnlineRow

            rows = [OnlineRow(k, end, values) for k, (end, values) in self._newest.items()]
            report = self._store.write(self._view, rows)
            self._newest.clear()
            self.counts.online_written += report.written
            self.counts.online_skipped_older += report.skipped_older
        if final and self._watermark == END_OF_INPUT:
            self._settled = END_OF_INPUT
        if self._settled != self._published and self._settled > -(2**63):
            self._store.write_progress(self._view, *self._slot, self._settled)
            self._published = self._settled

    def close(self) -> None:
        self._store.close()
