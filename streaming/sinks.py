"""What the job's Python functions write: rows, dead letters and progress. No Flink here.

Every writer buffers and is flushed at the end of each PyFlink bundle (see functions.py). A
bundle ends before Flink lets a checkpoint barrier pass the Python operator, so everything the
job emitted before a checkpoint is acknowledged by Kafka and Redis before that checkpoint
completes: at least once, end to end. After a failure the job replays from the checkpoint;
features-topic records may repeat, online-store writes are idempotent per (entity, end).

Why not PyFlink's Java KafkaSink with a side output: it cannot write record headers, and the
dead-letter format (infra/ingest.py) carries its reasons in headers. One producer path for
ingest and stream keeps that format in one place.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from core.kafka import CountingProducer
from core.settings import Settings
from events.ingest import dead_letter_headers
from features.definitions import FeatureView
from features.validation import Rejection
from streaming.compile import features_topic

# One record per operator instance whenever its counts changed, plus a final one: the driver
# turns them into throughput, lag and the run's counts.
STATS_TOPIC = "sluice.stream-stats"
H_VIEW = "sluice.view"


@dataclass(frozen=True)
class JobContext:
    """What every function of one run needs to reach the outside world (picklable)."""

    settings: Settings
    run_id: str


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class PrepareCounts:
    events: int = 0
    late: int = 0
    filtered: int = 0
    rejected: int = 0  # dead-lettered for another reason than late (bypassed ingest)
    first_at_ms: int = 0
    last_at_ms: int = 0
    watermark: int | None = None
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset to read


@dataclass
class WindowCounts:
    aggregated: int = 0  # events added to a key's tiles


@dataclass
class PublishCounts:
    rows: int = 0
    online_written: int = 0
    online_skipped_older: int = 0
    max_end_ms: int | None = None
    watermark: int | None = None


class StatsReporter:
    """Cumulative counters of one operator instance, sent whenever they changed.

    Reports are sent at bundle ends only (there is no timer without input), so a report that
    was skipped would stay stale for as long as no more input arrives: each change is sent.
    Bundles end at most every bundle_time_ms, which bounds the rate.
    """

    def __init__(self, producer: CountingProducer, ctx: JobContext, key: dict[str, Any]) -> None:
        self._producer = producer
        self._head = {"run": ctx.run_id, **key}
        self._key = "/".join(str(v) for v in self._head.values())
        self._last: dict[str, Any] | None = None

    def report(
        self, counts: PrepareCounts | WindowCounts | PublishCounts, *, final: bool = False
    ) -> None:
        body = self._head | vars(counts) | {"final": final}
        if not final and body == self._last:
            return
        self._last = copy.deepcopy(body)  # the offsets dict changes in place
        data = orjson.dumps(body | {"at_ms": now_ms()}, option=orjson.OPT_NON_STR_KEYS)
        self._producer.produce(STATS_TOPIC, data, self._key, now_ms())


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
        headers = dead_letter_headers(rejection, source.name, source.topic, partition, offset)
        # Lateness depends on the view (its slide), so the view is named too.
        headers.append((H_VIEW, self._view.name.encode()))
        # Timestamp 0: the broker stamps the time of dead-lettering, as ingest does.
        self._producer.produce(self._topic, raw, key, 0, headers)


class RowPublisher:
    """Rows to the online store (newest per entity) and to the view's features topic."""

    def __init__(self, producer: CountingProducer, ctx: JobContext, view: FeatureView) -> None:
        from feature_repo.online import OnlineStore

        self._producer = producer
        self._view = view
        self._topic = features_topic(view.name)
        self._store = OnlineStore(ctx.settings.redis_url, ctx.settings.feast_project)
        self._newest: dict[str, tuple[int, dict[str, Any]]] = {}
        self.counts = PublishCounts()

    def add(self, entity_key: str, window_end_ms: int, values: dict[str, Any]) -> None:
        record = {
            "view": self._view.name,
            "entity_key": entity_key,
            "window_end_ms": window_end_ms,
            "values": values,
            # Wall clock when the row left the window operator: monitoring derives freshness.
            "emitted_at_ms": now_ms(),
        }
        self._producer.produce(self._topic, orjson.dumps(record), entity_key, window_end_ms)
        # Rows of one key arrive oldest first. Within a bundle only the newest per entity
        # matters online: the store would refuse the older ones right after anyway.
        held = self._newest.get(entity_key)
        if held is None or held[0] <= window_end_ms:
            self._newest[entity_key] = (window_end_ms, values)
        self.counts.rows += 1
        if self.counts.max_end_ms is None or window_end_ms > self.counts.max_end_ms:
            self.counts.max_end_ms = window_end_ms

    def flush(self) -> None:
        """Write the held rows; raise (failing the bundle, so Flink retries) if anything fails."""
        if not self._newest:
            return
        from feature_repo.online import OnlineRow

        rows = [OnlineRow(k, end, values) for k, (end, values) in self._newest.items()]
        report = self._store.write(self._view, rows)
        self._newest.clear()
        self.counts.online_written += report.written
        self.counts.online_skipped_older += report.skipped_older

    def close(self) -> None:
        self._store.close()
