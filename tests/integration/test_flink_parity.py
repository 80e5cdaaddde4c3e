"""The Flink job against the reference and Spark, on a real broker and Redis: every row, every
late event.

Events go to the `events.*` topics as the validating ingest writes them (canonical JSON, keyed,
Kafka timestamp = event time), in two phases, so that which events are too late is certain:

phase 1  simulated traffic, out-of-order events within the allowed lateness, events on slide
         boundaries, events delivered twice (ingest is at least once: they count once),
         heartbeats as ingest writes them (not events: dropped and counted apart), a probe
         event per topic, then one sentinel per partition at time X.
         Once the probe's closing row is out, the watermark is exactly W = X - lateness.
phase 2  events far behind W, just behind it (their smallest window ends at W: too late) and
         at W (counted), on chosen partitions.
The job stops at the offsets after phase 2; at the end of the input it flushes every window.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from batch.compile import compile_view
from core.kafka import ensure_topics
from core.records import DeadLetter, FeatureRow
from core.settings import Settings
from examples.delivery.simulate import DeliverySimulator
from features.definitions import FeatureView
from features.reference import compute_view, prepare, with_closing_rows
from features.schema import EventSource
from streaming.compile import features_topic
from streaming.monitor import StreamReport
from streaming.runner import run as run_stream
from tests.helpers.spark import frame, spark_rows
from tests.helpers.stream import (
    PARTITIONS,
    START,
    STREAM_VIEWS,
    Event,
    Topic,
    closing_end,
    hand_made,
    patient_store,
    read_all,
    row_differences,
)

pytestmark = [pytest.mark.integration, pytest.mark.flink]

N_SIMULATED = 3000
FIVE_MIN = 300_000


def views_for(tag: str) -> tuple[dict[str, EventSource], list[FeatureView]]:
    sources = {
        s.name: s.model_copy(update={"topic": f"{tag}.events.{s.name}"})
        for s in {v.source.name: v.source for v in STREAM_VIEWS}.values()
    }
    views = [
        v.model_copy(update={"name": f"{v.name}_{tag}", "source": sources[v.source.name]})
        for v in STREAM_VIEWS
    ]
    return sources, views


def prefix(source_name: str) -> str:
    """Hand-made entities: restaurants r-..., zones z-... (simulated ones have no dash)."""
    return "r" if source_name == "orders" else "z"


def wait_for_row(
    settings: Settings, view: FeatureView, entity: str, end: int, job: threading.Thread
) -> bool:
    """Whether the row shows up on the features topic (False: the job ended, or 150 s)."""
    consumer = Consumer(settings.kafka_client_config(**{"group.id": f"w-{uuid.uuid4().hex}"}))
    topic = features_topic(view.name)
    started = time.monotonic()
    try:
        while not (partitions := consumer.list_topics(topic, timeout=10).topics[topic].partitions):
            if not job.is_alive():
                return False
            time.sleep(0.5)  # the job creates its topics as it starts
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        while time.monotonic() - started < 150 and job.is_alive():
            for msg in consumer.consume(1000, timeout=0.2):
                if msg.error() is not None:
                    continue
                row = FeatureRow.decode(msg.value())
                if (row.entity_key, row.window_end_ms) == (entity, end):
                    return True
    finally:
        consumer.close()
    return False


def test_flink_rows_equal_spark_and_reference_and_late_events_are_dead_lettered(
    stack_settings: Settings, spark: Any, tmp_path: Path
):
    tag = f"f{uuid.uuid4().hex[:8]}"
    settings = stack_settings.model_copy(
        update={
            "dead_letter_topic": f"{tag}.dead-letter",
            "state_dir": tmp_path,
            "feast_project": tag,
        }
    )
    sources, views = views_for(tag)
    ensure_topics(settings, [s.topic for s in sources.values()], partitions=PARTITIONS)
    topics = {name: Topic(settings, s) for name, s in sources.items()}
    lateness = {name: int(s.allowed_lateness.total_seconds() * 1000) for name, s in sources.items()}

    # Phase 1: simulated traffic with out-of-order and boundary events, all certain to count.
    simulator = DeliverySimulator(seed=11, start_ms=START)
    produced = 0
    newest = dict.fromkeys(topics, START)
    last_boundary = dict.fromkeys(topics, START)
    for event in simulator.events():
        topic = topics.get(event.source)
        if topic is None:
            continue
        valid = topic.canonical(event.payload)
        topic.produce(valid.values)
        t = valid.event_time_ms
        newest[event.source] = t
        produced += 1
        field = topic.source.event_time_field
        if produced % 50 == 0:  # behind the newest event by less than the allowed lateness
            topic.produce(valid.values | {field: t - lateness[event.source] + 1})
        boundary = t - t % 60_000
        if boundary != last_boundary[event.source] and t - boundary < lateness[event.source] - 1:
            # On a slide boundary, and just before one: both within the allowed lateness of the
            # newest event, so certain to count whenever the watermark moves.
            last_boundary[event.source] = boundary
            topic.produce(valid.values | {field: boundary})
            topic.produce(valid.values | {field: boundary - 1})
        if produced % 40 == 0:  # delivered twice, as after an ingest crash
            topic.produce(valid.values)
        if produced % 300 == 0:  # a heartbeat, stamped no later than the newest event
            topic.heartbeat(produced // 300 % PARTITIONS, newest[event.source])
        if produced >= N_SIMULATED:
            break
    # The probe's closing row ends exactly at W, so seeing it proves the watermark is W.
    w_final: dict[str, int] = {}
    probe_view: dict[str, FeatureView] = {}
    for name, topic in topics.items():
        on_topic = [v for v in views if v.source.name == name]
        ends = [closing_end(v, newest[name]) for v in on_topic]
        w_final[name] = math.ceil(max(ends) / FIVE_MIN) * FIVE_MIN
        probe_view[name] = view = max(on_topic, key=lambda v: closing_end(v, 0))
        probe_time = w_final[name] - view.max_window.size_ms - view.slide_ms
        assert closing_end(view, probe_time) == w_final[name]
        topic.produce(hand_made(topic.source, probe_time, f"{prefix(name)}-probe"))
        sentinel_time = w_final[name] + lateness[name]
        for p in range(PARTITIONS):
            topic.produce(hand_made(topic.source, sentinel_time, f"{prefix(name)}-end-{p}"), p)
        topic.flush()

    result: dict[str, StreamReport | BaseException] = {}

    def job() -> None:
        try:
            result["report"] = run_stream(settings, views, stop_at_offsets=stop, echo=print)
        except BaseException as exc:
            result["report"] = exc

    # Phase 2 goes to known partitions, so the stop offsets are known before it is produced.
    late_plan: dict[str, list[tuple[Event, int]]] = {}
    counted_plan: dict[str, list[tuple[Event, int]]] = {}
    for name, topic in topics.items():
        w = w_final[name]
        entity_field = "restaurant_id" if name == "orders" else "zone_id"
        entities = sorted({e[entity_field] for e in topic.events if "-" not in e[entity_field]})
        assert len(entities) > 5
        late_times = [START + 5 * 60_000 + k * 37_000 for k in range(6)] + [w - 1, w - 60_000]
        late_plan[name] = [
            (hand_made(topic.source, t, entities[i]), i % PARTITIONS)
            for i, t in enumerate(late_times)
        ]
        counted_plan[name] = [
            (hand_made(topic.source, t, entities[i]), (i + 1) % PARTITIONS)
            for i, t in enumerate((w, w + 1))
        ]
    stop = {
        topic.source.topic: {
            p: topic.next_offset[p]
            + sum(1 for _, q in late_plan[name] + counted_plan[name] if q == p)
            for p in range(PARTITIONS)
        }
        for name, topic in topics.items()
    }
    assert all(len([o for o in offs.values() if o]) == PARTITIONS for offs in stop.values())

    started = time.monotonic()
    runner = threading.Thread(target=job, daemon=True)
    runner.start()
    for name in topics:
        probe = (probe_view[name], f"{prefix(name)}-probe", w_final[name])
        if not wait_for_row(settings, *probe, runner):
            failure = result.get("report")
            if isinstance(failure, BaseException):
                raise failure
            raise AssertionError(f"no probe row {probe} within 150 s")
    phase1_s = time.monotonic() - started
    for name, topic in topics.items():
        for planned, p in late_plan[name] + counted_plan[name]:
            topic.produce(planned, p)
        topic.flush()
        assert {p: topic.next_offset[p] for p in range(PARTITIONS)} == stop[topic.source.topic]
    runner.join(timeout=180)
    assert not runner.is_alive(), "the bounded job did not finish"
    report = result["report"]
    if isinstance(report, BaseException):
        raise report
    total_s = time.monotonic() - started
    print(f"phase 1 out after {phase1_s:.1f} s, job done after {total_s:.1f} s")

    dead_by_view: dict[str, list[Message]] = defaultdict(list)
    for msg in read_all(settings, settings.dead_letter_topic):
        view_name = DeadLetter.from_headers(msg.headers()).view
        assert view_name is not None, "the stream names the view of its dead letters"
        dead_by_view[view_name].append(msg)

    for view in views:
        name = view.source.name
        topic = topics[name]
        late_bytes = Counter(topic.canonical(e).to_json() for e, _ in late_plan[name])
        dead = dead_by_view[view.name]
        assert Counter(m.value() for m in dead) == late_bytes, view.name
        for msg in dead:
            letter = DeadLetter.from_headers(msg.headers())
            assert letter.reason == "late"
            assert letter.source == name
            assert letter.source_topic == topic.source.topic
            assert letter.partition in range(PARTITIONS)
            assert letter.offset >= 0

        late_set = {
            orjson.dumps(e) for e in (topic.canonical(e).values for e, _ in late_plan[name])
        }
        unique = topic.unique_events()
        counted = [e for e in unique if orjson.dumps(e) not in late_set]
        assert len(counted) == len(unique) - len(late_plan[name])
        want = with_closing_rows(view, compute_view(view, counted))

        got: dict[tuple[str, int], dict[str, Any]] = {}
        for msg in read_all(settings, features_topic(view.name)):
            row = FeatureRow.decode(msg.value())
            key = (row.entity_key, row.window_end_ms)
            assert key not in got or got[key] == row.values, f"{key} differs when repeated"
            got[key] = row.values
        assert row_differences(got, want) == [], view.name
        # The batch engine over the same counted events: the training-serving contract.
        batch = spark_rows(view, compile_view(spark, view, frame(spark, view.source, counted)))
        assert row_differences(batch, want) == [], view.name
        assert row_differences(got, batch) == [], view.name

        stats = report.views[view.name]
        assert stats.events == len(topic.events), "every event read, repeats included"
        assert stats.heartbeats == topic.heartbeats > 0
        assert stats.late == len(late_plan[name])
        assert stats.rejected == 0
        # A repeat the view's filter drops counts as filtered; the others as duplicates.
        assert len(topic.events) - len(unique) > 5
        passing = [orjson.dumps(e) for e in topic.events if prepare(view, [e])]
        assert stats.duplicates == len(passing) - len(set(passing)) > 0
        assert stats.balanced(), stats
        assert stats.rows == len(want)
        if view.name.startswith("restaurant_orders"):
            # Each aggregated event is in exactly five rows' 5-minute count.
            assert sum(v["count_5m"] for v in want.values()) == 5 * stats.aggregated
            assert stats.filtered == 0

        newest_end: dict[str, int] = {}
        for entity, end in want:
            newest_end[entity] = max(end, newest_end.get(entity, end))
        entities = sorted(newest_end)
        with patient_store(settings) as store:
            stored = store.read(view, entities)
        for entity, online in zip(entities, stored, strict=True):
            assert online is not None, entity
            assert online.window_end_ms == newest_end[entity]
            expected = want[(entity, newest_end[entity])]
            assert (
                row_differences({(entity, 0): dict(online.values)}, {(entity, 0): expected}) == []
            )
    assert report.status == "FINISHED"
