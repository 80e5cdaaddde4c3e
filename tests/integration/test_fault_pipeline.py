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
from features.definitions import FeatureView
from features.reference import compute_view, with_closing_rows
from features.validation import EventValidator, ValidEvent
from streaming.java_windows import TILE_ENGINES
from streaming.runner import run as run_stream
from tests.helpers.pipeline import (
    SLUICE,
    definitions_module,
    events_in_topic,
    feature_rows,
    kill_tree,
    sluice_env,
)
from tests.helpers.stream import (
    PARTITIONS,
    START,
    Topic,
    closing_end,
    hand_made,
    patient_store,
    row_differences,
)

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
    with patient_store(settings) as store:
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
        # Killed once it has forwarded at least half of phase A (the check reads the topic
        # for a second: by then it has usually forwarded all of it). None of it is committed
        # yet: ingest commits every 50,000 records and when it stops.
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


def checkpoints(settings: Settings) -> list[Path]:
    """Completed checkpoints of every job under the state directory, oldest first."""
    found = (settings.state_dir / "flink").glob("*/checkpoints/*/chk-*/_metadata")
    return [p.parent for p in sorted(found, key=lambda p: p.stat().st_mtime)]


def row_is_online(settings: Settings, view: FeatureView, entity: str, end: int) -> bool:
    with patient_store(settings) as store:
        row = store.read(view, [entity])[0]
    return row is not None and row.window_end_ms >= end


def wait_for(what: str, check: Any, proc: subprocess.Popen[bytes], log: Path, limit_s: float):
    deadline = time.monotonic() + limit_s
    while not check():
        assert proc.poll() is None, f"sluice stream exited before {what}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {what} within {limit_s:.0f} s:\n{log.read_text()}"
        time.sleep(0.5)


def test_stream_sigkill_restores_the_latest_checkpoint(stack_settings: Settings, tmp_path: Path):
    settings, module, _ = isolated(stack_settings, tmp_path)
    view: FeatureView = module.pipe_view
    source = module.pings
    env = sluice_env(settings, module, SLUICE_FLINK_CHECKPOINT_INTERVAL_S="2", COLUMNS="1000")
    topic = Topic(settings, source)
    lateness = int(source.allowed_lateness.total_seconds() * 1000)
    events = [e.values for e in pings(module, 0, 25)]

    def by_time(event: dict[str, Any]) -> int:
        return int(event[source.event_time_field])

    # Phase A: 15 minutes of pings and a probe at minute 2: its closing row, at minute 13,
    # shows the job has made progress.
    probe_time = START + 2 * MINUTE
    probe_end = closing_end(view, probe_time)
    phase_a = [e for e in events if e[source.event_time_field] < START + 15 * MINUTE]
    # The probe goes in at its time, as ingest forwards events. Produced after phase A, 13
    # minutes behind its partition, it was late or not depending on how far the watermark had
    # got when the job read it (the tile engine dead-lettered it once).
    for e in sorted([*phase_a, hand_made(source, probe_time, "z-probe")], key=by_time):
        topic.produce(e)
    topic.flush()

    log = tmp_path / "stream.log"
    argv = [SLUICE, "stream", "--report-every", "2"]
    with log.open("ab") as out:
        first = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(
            "probe row online",
            lambda: row_is_online(settings, view, "z-probe", probe_end),
            first,
            log,
            180,
        )
        wait_for("checkpoint", lambda: checkpoints(settings), first, log, 60)
        # Phase B arrives while the job runs (in batches, a checkpoint every 2 s); half way
        # through, the job and its JVM and workers die.
        phase_b = events[len(phase_a) :]
        size = len(phase_b) // 10 + 1
        batches = [phase_b[i : i + size] for i in range(0, len(phase_b), size)]
        for i, batch in enumerate(batches[: len(batches) // 2]):
            if i:
                time.sleep(1.0)  # the job reads it and checkpoints in between
            for e in batch:
                topic.produce(e)
            topic.flush()
        # Killed right after the last batch arrived: the newest checkpoint cannot hold it.
    finally:
        killed = kill_tree(first.pid)
        first.wait(10)
    assert first.returncode == -signal.SIGKILL
    produced_at_kill = len(topic.events)
    retained = checkpoints(settings)
    assert retained, "the killed job left no checkpoint"

    for batch in batches[len(batches) // 2 :]:
        for e in batch:
            topic.produce(e)
    newest = max(e[source.event_time_field] for e in events)
    final_w = closing_end(view, newest)
    final_probe = final_w - view.max_window.size_ms - view.slide_ms
    topic.produce(hand_made(source, final_probe, "z-final"))
    for p in range(PARTITIONS):
        topic.produce(hand_made(source, final_w + lateness, f"z-end-{p}"), p)
    topic.flush()

    restarted = time.monotonic()
    with log.open("ab") as out:
        second = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(
            "final row online",
            lambda: row_is_online(settings, view, "z-final", final_w),
            second,
            log,
            180,
        )
        caught_up_s = time.monotonic() - restarted
        second.send_signal(signal.SIGINT)  # stops with a savepoint
        assert second.wait(120) == 0, log.read_text()
    finally:
        if second.poll() is None:
            kill_tree(second.pid)
            second.wait(10)
    text = log.read_text()
    # Snapshots are named by URI (file:///..., s3://...; core/uris.py).
    restoring = [r.removeprefix("file://") for r in re.findall(r"restoring (\S+?)\)", text)]
    assert restoring == [str(retained[-1])], "the second run restores the newest checkpoint"
    # The second run's counts (operator counters restart with it): its last progress line.
    name = re.escape(view.name)
    line = re.findall(rf"{name}: ([\d,]+) events.*?late ([\d,]+).*?duplicates ([\d,]+)", text)
    assert line, text
    reread, late, duplicates = (int(n.replace(",", "")) for n in line[-1])
    assert late == duplicates == 0
    # It read everything after its checkpoint: at least what came after the kill (the events
    # beyond that were read again, unless the first run had not read them).
    after_kill = len(topic.events) - produced_at_kill
    assert reread >= after_kill
    if settings.stream_engine in TILE_ENGINES:
        # Its counters are job state: the second run continued from the checkpoint's, so over
        # both runs every event was read once (`sluice stream`'s "(all runs)" row).
        totals = re.findall(rf"{name} \(all runs\)[\s│|]+(\d+)", text)
        assert totals, text
        assert int(totals[-1]) == len(topic.events)

    want = {
        k: v
        for k, v in with_closing_rows(view, compute_view(view, topic.unique_events())).items()
        if k[1] <= final_w
    }
    got, repeats = feature_rows(settings, view)
    assert row_differences(got, want) == []
    assert online_differences(settings, view, want) == []
    print(
        f"stream SIGKILL ({killed} processes): {len(topic.events)} events, "
        f"{produced_at_kill} produced before the kill, restored {retained[-1].name}; the second "
        f"run re-read {reread} ({reread - after_kill} read again after the checkpoint), "
        f"0 late, 0 duplicates; final row online {caught_up_s:.1f} s after the restart; "
        f"{len(want)} rows equal to the reference ({repeats} rows emitted twice, same values)"
    )
