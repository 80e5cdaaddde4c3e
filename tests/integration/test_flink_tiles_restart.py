"""The tile engine (stream_engine=tiles) stopped and resumed from its savepoint: offsets, open
tiles (in the SQL window state) and open windows (in Python) carry over.

test_flink_restart.py, for the tile engine, with one difference in the counts: the tile engine
counts an event when its tile closes (the count travels in the tile row), so the events of
tiles still open when run 2 stops (the sentinels, past the final watermark) are read but not
counted yet; they would be in a run 3. Everything before the final window end is counted once.

Run 1 reads simulated courier pings and is stopped (with a savepoint) as soon as a probe's
closing row is readable online, while later windows are still open in its state. More events
follow; run 2 restores the savepoint, reads only what run 1 had not, and finishes the windows
that were open. Together the two runs emit exactly the reference rows up to the final
watermark, and every event is read once.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from core.kafka import ensure_topics
from core.records import FeatureRow
from core.settings import Settings
from examples.delivery.features import zone_couriers
from examples.delivery.simulate import DeliverySimulator
from feature_repo.online_store import open_online_store
from features.definitions import FeatureView
from features.reference import compute_view, with_closing_rows
from streaming.compile import features_topic
from streaming.runner import run as run_stream
from tests.helpers.stream import (
    PARTITIONS,
    START,
    Topic,
    closing_end,
    hand_made,
    read_all,
    row_differences,
)

pytestmark = [pytest.mark.integration, pytest.mark.flink, pytest.mark.slow]


def row_is_online(settings: Settings, view: FeatureView, entity: str, end: int) -> bool:
    with open_online_store(settings) as store:
        row = store.read(view, [entity])[0]
    return row is not None and row.window_end_ms >= end


def test_tile_engine_restart_resumes_offsets_open_tiles_and_windows(
    stack_settings: Settings, tmp_path: Path
):
    tag = f"r{uuid.uuid4().hex[:8]}"
    settings = stack_settings.model_copy(
        update={
            "dead_letter_topic": f"{tag}.dead-letter",
            "state_dir": tmp_path,
            "feast_project": tag,
        }
    )
    source = zone_couriers.source.model_copy(update={"topic": f"{tag}.events.courier_pings"})
    view = zone_couriers.model_copy(update={"name": f"zone_couriers_{tag}", "source": source})
    ensure_topics(settings, [source.topic], partitions=PARTITIONS)
    topic = Topic(settings, source)
    lateness = int(source.allowed_lateness.total_seconds() * 1000)
    pings = (
        e for e in DeliverySimulator(seed=3, start_ms=START).events() if e.source == source.name
    )

    # Phase A: 15 minutes of pings; a probe at minute 2 closes at minute 13.
    probe_time = START + 2 * 60_000
    probe_end = closing_end(view, probe_time)
    newest = START
    for event in pings:
        values = topic.canonical(event.payload).values
        if values[source.event_time_field] >= START + 15 * 60_000:
            break
        if probe_time <= values[source.event_time_field] and probe_time > newest:
            topic.produce(hand_made(source, probe_time, "z-probe"))
        topic.produce(values)
        newest = values[source.event_time_field]
    topic.flush()
    phase_a = len(topic.events)

    lines: list[str] = []
    settings = settings.model_copy(update={"stream_engine": "tiles"})
    first = run_stream(
        settings,
        [view],
        echo=lines.append,
        report_every_s=5,
        should_stop=lambda: row_is_online(settings, view, "z-probe", probe_end),
    )
    assert first.status == "STOPPED"
    assert first.savepoint is not None
    stopped_at = first.views[view.name]
    assert stopped_at.late == 0
    stop_w, newest_a = stopped_at.watermark, newest
    assert stop_w is not None
    assert probe_end <= stop_w <= newest_a - lateness

    # Phase B: 10 more minutes, then a closing probe and a sentinel per partition.
    for event in pings:
        values = topic.canonical(event.payload).values
        if values[source.event_time_field] >= START + 25 * 60_000:
            break
        topic.produce(values)
        newest = values[source.event_time_field]
    final_w = closing_end(view, newest)
    final_probe = final_w - view.max_window.size_ms - view.slide_ms
    topic.produce(hand_made(source, final_probe, "z-final"))
    for p in range(PARTITIONS):
        topic.produce(hand_made(source, final_w + lateness, f"z-end-{p}"), p)
    topic.flush()
    assert len(topic.events) > phase_a

    second = run_stream(
        settings,
        [view],
        echo=lines.append,
        report_every_s=5,
        should_stop=lambda: row_is_online(settings, view, "z-final", final_w),
    )
    assert any("restoring" in line and "savepoint" in line for line in lines), lines
    resumed = second.views[view.name]
    assert resumed.late == 0
    time_field = source.event_time_field
    closed = [e for e in topic.events if e[time_field] < final_w]
    assert len(topic.events) - len(closed) == PARTITIONS  # the sentinels
    assert stopped_at.events + resumed.events == len(closed), "every closed event read once"
    assert stopped_at.balanced()
    assert resumed.balanced()

    want = {
        k: v
        for k, v in with_closing_rows(view, compute_view(view, topic.events)).items()
        if k[1] <= final_w
    }
    got: dict[tuple[str, int], Any] = {}
    for msg in read_all(settings, features_topic(view.name)):
        row = FeatureRow.decode(msg.value())
        key = (row.entity_key, row.window_end_ms)
        assert key not in got or got[key] == row.values
        got[key] = row.values
    assert row_differences(got, want) == []
    # Windows that were open at the stop, holding events of run 1, were emitted by run 2.
    assert any(stop_w < end <= newest_a + view.max_window.size_ms for _, end in want)
