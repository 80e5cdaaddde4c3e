"""Crashes of the pipeline mid-stream (SIGKILL, no shutdown of any kind), then a restart: the
features come out equal to the reference over the events produced, each event counted once.

- ingest: killed while it forwards raw events it has not committed yet; the restarted ingest
  forwards them again (at least once). The copies have the same canonical bytes, so the same
  event id (events/identity.py), and the stream job counts each event once.
- the stream job: `sluice stream` killed with its Flink JVM and Python workers while events
  keep arriving; the next `sluice stream` restores the newest retained checkpoint, re-reads
  what came after it and finishes the windows that were open.

Events carry synthetic times (tests/helpers/stream.py START) so that the windows and the
reference are exact; each test runs the view of its own definitions module.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from core.kafka import PRODUCER_DEFAULTS, ensure_topics
from core.settings import Settings
from examples.delivery.simulate import DeliverySimulator
from feature_repo.online_store import open_online_store
from features.definitions import FeatureView
from features.reference import compute_view, with_closing_rows
from features.validation import EventValidator, ValidEvent
from streaming.runner import run as run_stream
from tests.helpers.pipeline import (
    SLUICE,
    definitions_module,
    events_in_topic,
    feature_rows,
    kill_tree,
    sluice_env,
)
from tests.helpers.stream import PARTITIONS, START, closing_end, hand_made, row_differences

pytestmark = [pytest.mark.integration, pytest.mark.flink, pytest.mark.slow]
MINUTE = 60_000


def isolated(stack_settings: Settings, tmp_path: Path) -> tuple[Settings, ModuleType, str]:
    tag = f"p{uuid.uuid4().hex[:8]}"
    settings = stack_settings.model_copy(
        update={
            "dead_letter_topic": f"{tag}.dead-letter",
            "state_dir": tmp_path / "state",
            "feast_project": tag,
        }
    )
    settings.state_dir.mkdir()
    module = definitions_module(tmp_path, tag)
    ensure_topics(
        settings,
        [module.pings.topic, module.pings.raw_topic, settings.dead_letter_topic],
        partitions=PARTITIONS,
    )
    return settings, module, tag


def pings(module: ModuleType, from_min: int, to_min: int) -> list[ValidEvent]:
    """The simulated pings of minutes [from_min, to_min) after START, validated."""
    validator = EventValidator(module.pings)
    out = []
    for event in DeliverySimulator(seed=5, start_ms=START).events():
        if event.source != module.pings.name:
            continue
        valid = validator.validate_object(event.payload, now_ms=START + 86_400_000)
        assert isinstance(valid, ValidEvent), valid
        if valid.event_time_ms >= START + to_min * MINUTE:
            break
        if valid.event_time_ms >= START + from_min * MINUTE:
            out.append(valid)
    return out


def online_differences(
    settings: Settings, view: FeatureView, want: dict[tuple[str, int], Any]
) -> list[str]:
    """Each entity's online row against its newest reference row."""
    newest: dict[str, int] = {}
    for entity, end in want:
        newest[entity] = max(end, newest.get(entity, end))
    entities = sorted(newest)
    with open_online_store(settings) as store:
        stored = store.read(view, entities)
    problems = []
    for entity, online in zip(entities, stored, strict=True):
        if online is None or online.window_end_ms != newest[entity]:
            got = None if online is None else online.window_end_ms
            problems.append(f"{entity}: online row ends {got}, reference {newest[entity]}")
            continue
        key = (entity, newest[entity])
        problems += row_differences({key: dict(online.values)}, {key: want[key]})
    return problems


def ingest_counts(log: Path) -> tuple[int, int, int]:
    match = re.search(r"(\d+) in = (\d+) valid \+ (\d+) dead-lettered", log.read_text())
    assert match, log.read_text()
    received, valid, dead = map(int, match.groups())
    return received, valid, dead


def test_ingest_sigkill_and_restart_counts_each_event_once(
    stack_settings: Settings, tmp_path: Path
):
    settings, module, _ = isolated(stack_settings, tmp_path)
    view: FeatureView = module.pipe_view
    source = module.pings
    env = sluice_env(settings, module, SLUICE_INGEST_HEARTBEAT_MS="0")
    producer = Producer(settings.kafka_client_config(**PRODUCER_DEFAULTS))

    def produce_raw(events: list[ValidEvent]) -> None:
        for e in events:
            producer.produce(source.raw_topic, orjson.dumps(e.values), e.key.encode())
            producer.poll(0)
        assert producer.flush(30) == 0

    phase_a, phase_b = pings(module, 0, 12), pings(module, 12, 20)
    produce_raw(phase_a)
    log = tmp_path / "ingest.log"
    group = ["--group", f"{view.name}-ingest"]
    with log.open("ab") as out:
        first = subprocess.Popen(
            [SLUICE, "ingest", "--idle-timeout", "0", *group],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # Killed as soon as it has forwarded half of phase A: none of it is committed yet
        # (ingest commits every 50,000 records and when it stops).
        deadline = time.monotonic() + 90
        while len(events_in_topic(settings, source.topic)) < len(phase_a) // 2:
            assert first.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "ingest forwarded too little within 90 s"
            time.sleep(0.2)
    finally:
        kill_tree(first.pid)
        first.wait(10)
    assert first.returncode == -signal.SIGKILL
    before_kill = len(events_in_topic(settings, source.topic))

    produce_raw(phase_b)
    restarted = time.monotonic()
    with log.open("ab") as out:
        second = subprocess.run(
            [SLUICE, "ingest", "--idle-timeout", "3", *group],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=120,
            check=False,
        )
    restart_s = time.monotonic() - restarted
    assert second.returncode == 0, log.read_text()
    received, valid, dead = ingest_counts(log)
    produced = phase_a + phase_b
    assert (received, valid, dead) == (len(produced), len(produced), 0), "all replayed"

    records = events_in_topic(settings, source.topic)
    assert len(records) == before_kill + received
    values = Counter(m.value() for m in records)
    assert set(values) == {e.to_json() for e in produced}, "every event forwarded, none lost"
    copies = len(records) - len(values)
    assert copies == before_kill > 0

    stop: dict[int, int] = {}
    for m in records:
        stop[m.partition()] = max(stop.get(m.partition(), 0), m.offset() + 1)
    lines: list[str] = []
    report = run_stream(
        settings,
        [view],
        stop_at_offsets={source.topic: {p: stop.get(p, 0) for p in range(PARTITIONS)}},
        echo=lines.append,
    )
    assert report.status == "FINISHED", lines
    stats = report.views[view.name]
    want = with_closing_rows(view, compute_view(view, [e.values for e in produced]))
    got, repeats = feature_rows(settings, view)
    assert row_differences(got, want) == []
    assert online_differences(settings, view, want) == []
    assert stats.events == len(records)
    assert stats.aggregated == len(produced), "each event counted once"
    # A copy the job sees while its window is open is a duplicate; one behind the watermark
    # (its original already moved the watermark on) is late: dropped either way.
    assert stats.duplicates + stats.late == copies
    assert stats.balanced(), stats
    print(
        f"ingest SIGKILL: {len(produced)} events produced, {before_kill} forwarded before the "
        f"kill, {received} re-read after the restart ({restart_s:.1f} s to drain), "
        f"{len(records)} records in {source.topic} ({copies} copies); stream: "
        f"{stats.aggregated} counted, {stats.duplicates} duplicates and {stats.late} late "
        f"dropped; {len(want)} rows equal to the reference ({repeats} repeated records)"
    )
