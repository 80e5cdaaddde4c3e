"""`sluice monitor`'s loop: a restartable Kafka consumer feeding the Monitor (monitor.py).

Topics: the prediction log, the feedback topic and ``features.<view>`` of every stream view;
results and alerts go to ``settings.monitoring_topic``.

When a period is over: per topic, each partition's newest record time is tracked; the topic's
watermark is the lowest of them, leaving out idle partitions: read up to the broker's high
watermark (as the consumer last fetched it) and quiet for IDLE_PARTITION_S, so that neither a
quiet partition nor one whose backlog is still being fetched decides alone; a period closes
when the watermark passes its end plus ``monitor_grace_s``. A topic with no record for a period
plus the grace closes by the wall clock. A bounded run (``until_ms``, ``idle_timeout_s``)
closes everything left at its end.

Restarts: offsets are committed to the consumer group ``settings.monitor_group``, never past
a record whose period is still open (or whose skew sample is still out): per partition the
lowest offset such a record has, else the next offset to read. What was closed is kept in
``<state_dir>/monitor/<group>.json`` (per topic, the end of the newest closed period), written
before each commit; after a restart, records re-read for closed periods count as late and are
left out, so no period is reported twice with part of its rows. Ctrl-C commits and stops
without closing the open periods: the next run reads them again. Feedback whose prediction was
read before the restart joins only when the server had matched it (the record carries it).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from core.errors import RecordError
from core.kafka import CountingProducer, ensure_topics
from core.records import FeatureRow, FeedbackRecord, PredictionRecord
from core.settings import Settings
from features.definitions import FeatureService, FeatureView
from models.registry import ModelRegistry
from monitoring.errors import MonitorConsumerError
from monitoring.live_error import ErrorTotals
from monitoring.metrics import MonitorMetrics
from monitoring.monitor import Monitor
from monitoring.records import AlertRecord, MonitorRecord
from monitoring.skew import Offline, SkewChecker, spark_offline
from monitoring.state import MonitorState
from monitoring.traffic import CacheScraper

log = logging.getLogger("sluice.monitor")
IDLE_PARTITION_S = 2.0
COMMIT_EVERY_S = 2.0
SKEW_WAIT_S = 300.0  # a bounded run waits this long for its last skew samples


@dataclass
class MonitorSummary:
    """What a run did, for the summary table and tests."""

    consumed: dict[str, int]
    late: dict[str, int]
    invalid: dict[str, int]
    written: int
    alerts: list[AlertRecord]
    latest: list[MonitorRecord]
    mae: dict[tuple[str, int], ErrorTotals]
    notes: dict[str, str]
    interrupted: bool = False
    skew_unfinished: int = 0


def stream_topics(views: Mapping[str, FeatureView]) -> dict[str, FeatureView]:
    return {f"features.{v.name}": v for v in views.values() if "flink" in v.engines}


def state_file(settings: Settings) -> Path:
    return settings.state_dir / "monitor" / f"{settings.monitor_group}.json"


def load_closed(settings: Settings) -> dict[str, int]:
    try:
        data = orjson.loads(state_file(settings).read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, orjson.JSONDecodeError) as exc:
        log.warning("monitor state unreadable, starting afresh", extra={"error": str(exc)})
        return {}
    closed = data.get("closed_until", {}) if isinstance(data, dict) else {}
    return {str(k): int(v) for k, v in closed.items() if isinstance(v, int)}


def save_closed(settings: Settings, closed: Mapping[str, int]) -> None:
    path = state_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_bytes(orjson.dumps({"closed_until": dict(closed)}))
    temporary.replace(path)


_NOTHING = -(2**62)


@dataclass
class _Partition:
    newest_ms: int = _NOTHING
    seen_at: float = 0.0


@dataclass
class Watermarks:
    """Per topic and partition, the newest record time and when it was read."""

    partitions: dict[tuple[str, int], _Partition] = field(default_factory=dict)
    last_record_at: dict[str, float] = field(default_factory=dict)

    def assign(self, topic: str, partition: int, now: float) -> None:
        """A partition just assigned holds the watermark back until it delivers a record or
        stays quiet for IDLE_PARTITION_S (its backlog may not have been fetched yet)."""
        self.partitions.setdefault((topic, partition), _Partition(seen_at=now))

    def see(self, topic: str, partition: int, time_ms: int, now: float) -> None:
        state = self.partitions.setdefault((topic, partition), _Partition())
        state.newest_ms = max(state.newest_ms, time_ms)
        state.seen_at = now
        self.last_record_at[topic] = now

    def watermark(
        self, topic: str, now: float, caught_up: Callable[[str, int], bool] | None = None
    ) -> int | None:
        """The lowest newest time over the topic's partitions that are not idle (quiet for
        IDLE_PARTITION_S and, when ``caught_up`` says so, read to their end)."""
        active = [
            p.newest_ms
            for (t, n), p in self.partitions.items()
            if t == topic
            and not (now - p.seen_at > IDLE_PARTITION_S and (caught_up is None or caught_up(t, n)))
        ]
        if not active or min(active) == _NOTHING:
            return None
        return min(active)


class OffsetTracker:
    """The lowest offset per partition that an open period still needs."""

    def __init__(self) -> None:
        self.held: dict[tuple[str, int], dict[int, int]] = {}  # (topic, start) -> part -> off
        self.next_offset: dict[tuple[str, int], int] = {}  # (topic, partition) -> next

    def read(self, topic: str, partition: int, offset: int, period: int | None) -> None:
        key = (topic, partition)
        self.next_offset[key] = max(self.next_offset.get(key, 0), offset + 1)
        if period is not None:
            held = self.held.setdefault((topic, period), {})
            held[partition] = min(held.get(partition, offset), offset)

    def release(self, topic: str, period: int) -> None:
        self.held.pop((topic, period), None)

    def commit_points(self) -> dict[tuple[str, int], int]:
        points = dict(self.next_offset)
        for (topic, _), partitions in self.held.items():
            for partition, offset in partitions.items():
                key = (topic, partition)
                points[key] = min(points.get(key, offset), offset)
        return points


def run_monitor(
    settings: Settings,
    *,
    until_ms: int | None = None,
    idle_timeout_s: float | None = None,
    stop: threading.Event | None = None,
    state: MonitorState | None = None,
    metrics: MonitorMetrics | None = None,
    predictor_url: str | None = None,
    offline: Offline | None = None,
    echo: Callable[[str], None] | None = None,
    views: Mapping[str, FeatureView] | None = None,
    services: Mapping[str, FeatureService] | None = None,
) -> MonitorSummary:
    """Consume until ``stop`` is set, Ctrl-C, ``until_ms`` (record time) is reached by every
    topic, or nothing came for ``idle_timeout_s``; return what was found."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    if views is None or services is None:
        from features.registry import load_registry

        registry = load_registry(settings.definitions_module)
        views = registry.views if views is None else views
        services = registry.services if services is None else services
    streams = stream_topics(views)
    topics = [settings.prediction_topic, settings.feedback_topic, *streams]
    ensure_topics(settings, [*topics, settings.monitoring_topic])
    producer = CountingProducer(settings, **{"linger.ms": 50})
    state = state or MonitorState(settings.monitor_period_s)
    skew = (
        SkewChecker(offline or spark_offline(settings))
        if settings.monitor_skew_sample > 0
        else None
    )

    def sink(record: MonitorRecord | AlertRecord) -> None:
        producer.produce(settings.monitoring_topic, record.encode(), key=record.key.encode())

    monitor = Monitor(
        settings,
        views=views,
        services=services,
        registry=ModelRegistry(settings.models_dir),
        sink=sink,
        skew=skew,
        state=state,
        metrics=metrics,
    )
    monitor.closed_until = load_closed(settings)
    consumer = Consumer(
        settings.kafka_client_config(
            **{
                "group.id": settings.monitor_group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "session.timeout.ms": 6000,
            }
        )
    )
    assigned: list[float] = []
    marks = Watermarks()

    def on_assign(_consumer: Any, partitions: list[Any]) -> None:
        now = time.monotonic()
        assigned.append(now)
        for tp in partitions:
            marks.assign(tp.topic, tp.partition, now)

    consumer.subscribe(topics, on_assign=on_assign)
    offsets = OffsetTracker()
    cache = CacheScraper(predictor_url)
    state.cache_reading(None, cache.note)
    invalid: dict[str, int] = {}
    grace_ms = int(settings.monitor_grace_s * 1000)
    period_s = settings.monitor_period_s
    started = time.monotonic()
    last_record = started
    last_commit = started
    last_scrape = 0.0
    interrupted = False
    say = echo or (lambda _text: None)
    say(f"monitor: reading {', '.join(topics)} as group {settings.monitor_group}")

    def caught_up(topic: str, partition: int) -> bool:
        """Whether the partition is read to the high watermark of the consumer's last fetch
        (approximate on Tansu, exact on Kafka); unknown counts as not."""
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
        if high < 0:
            return False
        position = offsets.next_offset.get((topic, partition))
        if position is None:
            (current,) = consumer.position([TopicPartition(topic, partition)])
            position = current.offset if current.offset >= 0 else None
        return high <= low if position is None else position >= high

    def kind_of(topic: str) -> str:
        if topic == settings.prediction_topic:
            return "predictions"
        if topic == settings.feedback_topic:
            return "feedback"
        return topic

    def handle(message: Any) -> None:
        topic, value, partition = message.topic(), message.value(), message.partition()
        kind = kind_of(topic)
        record: PredictionRecord | FeedbackRecord | FeatureRow
        try:
            if kind == "predictions":
                record = PredictionRecord.decode(value)
                at = record.time_ms
            elif kind == "feedback":
                record = FeedbackRecord.decode(value)
                at = record.time_ms
            else:
                record = FeatureRow.decode(value)
                at = record.emitted_at_ms
        except RecordError as exc:
            invalid[kind] = invalid.get(kind, 0) + 1
            monitor.metrics.records.labels(kind, "invalid").inc()
            if invalid[kind] == 1:
                log.warning("invalid record skipped", extra={"topic": topic, "error": str(exc)})
            offsets.read(topic, partition, message.offset(), None)
            return
        marks.see(topic, partition, at, time.monotonic())
        if until_ms is not None and at >= until_ms:
            return  # not read: the next run starts here
        if isinstance(record, PredictionRecord):
            period = monitor.add_prediction(topic, record)
        elif isinstance(record, FeedbackRecord):
            period = monitor.add_feedback(topic, record)
        else:
            period = monitor.add_feature_row(topic, record)
        state.count(kind)
        monitor.metrics.records.labels(kind, "used" if period is not None else "late").inc()
        offsets.read(topic, partition, message.offset(), period)

    def close_due(now: float, final: bool) -> None:
        wall_ms = int(time.time() * 1000)
        for topic in topics:
            if final:
                closed = monitor.close_all(topic)
            else:
                quiet = now - marks.last_record_at.get(topic, now) > period_s + grace_ms / 1000
                up_to = wall_ms if quiet else marks.watermark(topic, now, caught_up)
                if up_to is None:
                    continue
                closed = monitor.close(topic, up_to - grace_ms)
            for start in closed:
                offsets.release(topic, start)
        for topic, start in monitor.poll():
            offsets.release(topic, start)

    def commit() -> None:
        producer.flush(60)
        save_closed(settings, monitor.closed_until)
        points = [TopicPartition(t, p, o) for (t, p), o in offsets.commit_points().items()]
        if points:
            try:
                consumer.commit(offsets=points, asynchronous=False)
            except KafkaException as exc:
                log.warning("offset commit failed", extra={"error": str(exc)})

    try:
        while stop is None or not stop.is_set():
            try:
                messages = consumer.consume(500, timeout=0.2)
            except KafkaException as exc:
                raise MonitorConsumerError(f"reading {', '.join(topics)}: {exc}") from exc
            now = time.monotonic()
            for message in messages:
                if message.error() is not None:
                    continue
                handle(message)
                last_record = now
            close_due(now, final=False)
            if now - last_commit > COMMIT_EVERY_S:
                commit()
                last_commit = now
            if now - last_scrape > max(1.0, period_s):
                state.cache_reading(cache.scrape(int(time.time() * 1000)), cache.note)
                last_scrape = now
            since = max(last_record, assigned[0] if assigned else started)
            waited = assigned or now - started > 30  # idle counts from the group's assignment
            if idle_timeout_s is not None and waited and now - since > idle_timeout_s:
                break
            reached = _reached(marks, topics, until_ms, now, caught_up) if until_ms else False
            if assigned and reached:
                break
        else:
            interrupted = True
        bounded = not interrupted
    except KeyboardInterrupt:
        interrupted, bounded = True, False
    try:
        if bounded:
            close_due(time.monotonic(), final=True)
            deadline = time.monotonic() + SKEW_WAIT_S
            while monitor.pending_skew and time.monotonic() < deadline:
                time.sleep(0.2)
                close_due(time.monotonic(), final=True)
        else:
            for topic, start in monitor.poll():
                offsets.release(topic, start)
        commit()
    finally:
        consumer.close()
        if skew is not None:
            skew.close()
    return MonitorSummary(
        consumed=dict(state.consumed),
        late=dict(monitor.late),
        invalid=invalid,
        written=monitor.written,
        alerts=list(monitor.alerts_raised),
        latest=state.latest(),
        mae=dict(monitor.join.totals),
        notes=dict(state.notes),
        interrupted=interrupted,
        skew_unfinished=sum(monitor.pending_skew.values()),
    )


def _reached(
    marks: Watermarks,
    topics: list[str],
    until_ms: int,
    now: float,
    caught_up: Callable[[str, int], bool],
) -> bool:
    """Whether every topic that has records reached until_ms (or went quiet)."""
    for topic in topics:
        if topic not in marks.last_record_at:
            continue
        mark = marks.watermark(topic, now, caught_up)
        if mark is not None and mark < until_ms:
            return False
    return bool(marks.last_record_at)
