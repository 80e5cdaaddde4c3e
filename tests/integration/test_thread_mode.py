"""PyFlink's thread mode (PEMJA) is at least once: rows are written before a checkpoint
completes (streaming/python_operators.py, streaming/java/sluice/BundleEnds.java).

Flink 2.0's own embedded operators never end a bundle, so the writers of a Python function
would hold their rows past every checkpoint until the operator closes. Here the bundle time is
10 minutes, so the base class's timer never ends a bundle while the test runs: only the
bundle end before each checkpoint barrier (every 2 s) can write the rows, and they must be
readable while the job runs. Then a stop with a savepoint closes the function (its final
flush and counts; PyFlink's thread mode closes it only at the end of input), and the counts
balance. Both engines whose Python functions write: tiles-java (keyed) and events (a
ProcessFunction before the keyed one).
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from core.kafka import ensure_topics
from core.settings import Settings
from examples.delivery.simulate import DeliverySimulator
from features.validation import EventValidator, ValidEvent
from streaming.job import JobOptions
from streaming.monitor import StreamReport
from streaming.runner import run as run_stream
from tests.helpers.pipeline import definitions_module
from tests.helpers.stream import PARTITIONS, START, Topic, hand_made, patient_store

pytestmark = [pytest.mark.integration, pytest.mark.flink, pytest.mark.slow]

MINUTE = 60_000
EVENT_MINUTES = 8
LIMIT_S = 120


def pings(source: Any) -> list[dict[str, Any]]:
    validator = EventValidator(source)
    out: list[dict[str, Any]] = []
    for event in DeliverySimulator(seed=11, start_ms=START).events():
        if event.source != source.name:
            continue
        valid = validator.validate_object(event.payload, now_ms=START + 86_400_000)
        assert isinstance(valid, ValidEvent), valid
        if valid.event_time_ms >= START + EVENT_MINUTES * MINUTE:
            return out
        out.append(valid.values)
    return out


@pytest.mark.parametrize("engine", ["tiles-java", "events"])
def test_thread_mode_writes_rows_at_checkpoints_and_closes_on_a_savepoint(
    stack_settings: Settings, tmp_path: Path, engine: str
) -> None:
    tag = f"t{uuid.uuid4().hex[:8]}"
    settings = stack_settings.model_copy(
        update={"dead_letter_topic": f"{tag}.dead-letter", "state_dir": tmp_path / "state"}
    )
    settings.state_dir.mkdir()
    module = definitions_module(tmp_path, tag)
    view, source = module.pipe_view, module.pings
    ensure_topics(settings, [source.topic, settings.dead_letter_topic], partitions=PARTITIONS)
    topic = Topic(settings, source)
    events = pings(source)
    for event in events:
        topic.produce(event)
    # Every partition past minute EVENT_MINUTES + 2: the windows ending up to then close.
    closed_end = START + (EVENT_MINUTES + 2) * MINUTE
    lateness = int(source.allowed_lateness.total_seconds() * 1000)
    for p in range(PARTITIONS):
        topic.produce(hand_made(source, closed_end + lateness + 1_000, f"z-end-{p}"), p)
    topic.flush()
    zones = sorted({e["zone_id"] for e in events})
    assert len(zones) >= 3

    stop = threading.Event()
    result: dict[str, Any] = {}
    lines: list[str] = []

    def stream() -> None:
        try:
            result["report"] = run_stream(
                settings,
                [view],
                options=JobOptions(
                    engine=engine,
                    python_mode="thread",
                    checkpoint_interval_s=2,
                    bundle_time_ms=600_000,  # no bundle ends by time: only at barriers
                ),
                report_every_s=2,
                echo=lines.append,
                should_stop=stop.is_set,
            )
        except BaseException as error:  # reported by the test thread
            result["error"] = error

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + LIMIT_S
        missing = zones
        while missing:
            assert thread.is_alive(), f"{result.get('error')!r}\n" + "\n".join(lines)
            assert time.monotonic() < deadline, (
                f"rows of {missing} not online within {LIMIT_S} s while the job ran:\n"
                + "\n".join(lines)
            )
            time.sleep(0.5)
            with patient_store(settings) as store:
                rows = store.read(view, missing)
            missing = [
                z
                for z, r in zip(missing, rows, strict=True)
                if r is None or r.window_end_ms < closed_end
            ]
        assert thread.is_alive(), "the rows were written while the job ran, not at its end"
    finally:
        stop.set()
        thread.join(120)
    assert not thread.is_alive(), "the job did not stop with a savepoint within 120 s"
    assert "error" not in result, f"{result['error']!r}\n" + "\n".join(lines)
    report: StreamReport = result["report"]
    assert report.status == "STOPPED", report
    assert report.savepoint, report
    counts = report.views[view.name]
    # Closed by the stop (its final report): every event read, each one accounted for.
    assert counts.events == len(topic.events), counts
    assert counts.balanced(), counts
