"""Live training/serving consistency (issue 10's acceptance test).

`sluice produce --rate 300`, `sluice ingest`, `sluice stream` and `sluice archive` run side by
side on a stack of their own (tests/helpers/stream_definitions.py: 1-minute windows sliding
every 5 s, sources waiting 2 s for late events, views servable 5 s after a window ends). While
they run, a sampler asks the online store what the predictor would serve at t (the newest and
the previous row, chosen by features/contract.py) for random entities. Ingest and the archiver
are each killed with SIGKILL once mid-run and restarted. Afterwards Spark backfills the archive
(the batch history) and builds a point-in-time training set for every sample's (entity, t):
the value training uses for t must equal the value served at t, row by row, or be flagged
`behind`. The sampler reads the stream's progress per view before the rows, as the predictor
does: during ingest's outage the stream cannot finish windows, and a row due but not written
yet (an entity's first, or the one after a closing row) must read `behind`, not `missing`.
"""

from __future__ import annotations

import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings, load_settings
from events.history import read_history
from features.contract import RowStatus, StoredRow, choose_row
from features.definitions import FeatureService, FeatureView
from features.reference import empty_row
from infra.stack import free_port
from tests.helpers.pipeline import background, stop
from tests.helpers.stream import patient_store, wait_until_reading
from tests.helpers.stream_definitions import live_restaurant_orders, live_zone_couriers

pytestmark = [pytest.mark.integration, pytest.mark.flink, pytest.mark.spark, pytest.mark.slow]
SLUICE = str(Path(sys.executable).parent / "sluice")
RATE = 300
PRODUCE_S = 80
# After ingest's restart: its group join, the replay, the stream catching up.
OUTAGE_GRACE_MS = 20_000
VIEWS = (live_restaurant_orders, live_zone_couriers)
# Popular restaurants (Zipf by index) and every zone: most samples see busy windows.
KEYS = {
    live_restaurant_orders.name: [f"r{i:05d}" for i in range(25)],
    live_zone_couriers.name: [f"z{i:02d}" for i in range(12)],
}


@dataclass(frozen=True)
class Sample:
    view: str
    key: str
    t_ms: int
    values: dict[str, Any]
    status: RowStatus


def sluice(env: dict[str, str], *args: str, timeout: float = 180) -> str:
    proc = subprocess.run(
        [SLUICE, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"sluice {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


class Sampler(threading.Thread):
    """What the predictor serves at t, for random (view, entity), every few milliseconds."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.samples: list[Sample] = []
        self.with_progress = 0  # samples that knew the stream's progress of their view
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(10)
        by_name = {v.name: v for v in VIEWS}
        try:
            # This sampler checks values, not latency (patient_store).
            with patient_store(self.settings) as store:
                while not self.done.is_set():
                    requests = [(v, [rng.choice(KEYS[v.name])]) for v in VIEWS]
                    t_ms = int(time.time() * 1000)
                    progress = store.read_progress(VIEWS)
                    answers = store.read_many(requests)
                    for (view, keys), rows in zip(requests, answers, strict=True):
                        row = rows[0]
                        newest = previous = None
                        if row is not None:
                            newest = StoredRow(row.window_end_ms, bool(row.empty))
                            if row.previous is not None:
                                previous = StoredRow(
                                    row.previous.window_end_ms, bool(row.previous.empty)
                                )
                        chosen, status = choose_row(
                            view, t_ms, newest, previous, progress.get(view.name)
                        )
                        self.with_progress += view.name in progress
                        values = empty_row(by_name[view.name])
                        if chosen is not None and row is not None:
                            served = row if chosen.window_end_ms == row.window_end_ms else None
                            served = served or row.previous
                            assert served is not None
                            values = dict(served.values)
                        self.samples.append(Sample(view.name, keys[0], t_ms, values, status))
                    time.sleep(0.015)
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def same(a: Any, b: Any) -> bool:
    if a is None or b is None or (isinstance(b, float) and math.isnan(b)):
        return (a is None or (isinstance(a, float) and math.isnan(a))) and (
            b is None or (isinstance(b, float) and math.isnan(b))
        )
    return bool(math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9))


def training_values(
    spark: Any, settings: Settings, view: FeatureView, samples: list[Sample]
) -> list[dict[str, Any]]:
    """The value training uses at each sample's t: a Spark point-in-time training set."""
    from batch.training import feature_column, training_set

    service = FeatureService(name=f"probe_{view.name}", views=(view,))
    key = view.entity.join_key
    labels = spark.createDataFrame(
        [(i, s.key, s.t_ms) for i, s in enumerate(samples)], ["sample", key, "event_timestamp"]
    )
    rows = training_set(spark, settings, service, labels).collect()
    by_sample = {r["sample"]: r for r in rows}
    assert len(by_sample) == len(samples)
    return [
        {spec.name: by_sample[i][feature_column(view.name, spec.name)] for spec in view.features()}
        for i in range(len(samples))
    ]


def test_value_served_at_t_is_the_value_training_uses_for_t(tmp_path: Path, spark: Any) -> None:
    env = os.environ | {
        "SLUICE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "SLUICE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "SLUICE_STATE_DIR": str(tmp_path / "state"),
        "SLUICE_FEAST_REGISTRY": str(tmp_path / "registry.db"),
        "SLUICE_OFFLINE_STORE_DIR": str(tmp_path / "offline"),
        "SLUICE_HISTORY_DIR": str(tmp_path / "history"),
        "SLUICE_FEAST_PROJECT": "live_consistency",
        "SLUICE_DEFINITIONS_MODULE": "tests.helpers.stream_definitions",
        "COLUMNS": "200",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    settings = load_settings(
        kafka_bootstrap=env["SLUICE_KAFKA_BOOTSTRAP"],
        redis_url=env["SLUICE_REDIS_URL"],
        state_dir=tmp_path / "state",
        feast_registry=tmp_path / "registry.db",
        offline_store_dir=tmp_path / "offline",
        history_dir=tmp_path / "history",
        feast_project="live_consistency",
        definitions_module="tests.helpers.stream_definitions",
    )
    logs = {name: tmp_path / f"{name}.log" for name in ("stream", "ingest", "archive", "produce")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    outage_ms = [0, 0]
    warm_up = ""
    sampler = Sampler(settings)
    sluice(env, "up")
    try:
        sluice(env, "features", "apply")
        procs["stream"] = background(env, logs["stream"], "stream", "--report-every", "5")
        procs["archive"] = background(env, logs["archive"], "archive", "--idle-timeout", "600")
        procs["ingest"] = background(env, logs["ingest"], "ingest", "--idle-timeout", "600")
        # The Flink job starts: on a loaded machine that took from 20 s to over a minute, and
        # a fixed wait sampled a stream that had not started yet. One second of traffic first
        # (ingest writes heartbeats to a topic only once it had an event); then wait until the
        # job has read it and counts ingest's heartbeats.
        warm_up = sluice(env, "produce", "--rate", str(RATE), "--events", str(RATE), "--seed", "8")
        wait_until_reading(logs["stream"], [v.name for v in VIEWS], 240)
        events = RATE * PRODUCE_S
        procs["produce"] = background(
            env, logs["produce"], "produce", "--rate", str(RATE), "--events", str(events)
        )
        time.sleep(15)  # warm-up: the first windows close and become servable
        sampler.start()
        time.sleep(15)
        outage_ms[0] = int(time.time() * 1000)
        procs["ingest"].kill()  # SIGKILL: ingest replays what it had not committed
        procs["ingest"].wait(timeout=30)
        procs["ingest"] = background(env, logs["ingest"], "ingest", "--idle-timeout", "600")
        # Without ingest no event and no heartbeat reaches the stream: windows cannot close
        # until the new ingest has joined its group (Tansu: seconds) and caught up.
        outage_ms[1] = int(time.time() * 1000) + OUTAGE_GRACE_MS
        time.sleep(15)
        procs["archive"].kill()  # SIGKILL: the archiver resumes from the offsets it wrote
        procs["archive"].wait(timeout=30)
        procs["archive"] = background(env, logs["archive"], "archive", "--idle-timeout", "600")
        assert procs["produce"].wait(timeout=PRODUCE_S + 120) == 0, logs["produce"].read_text()
        time.sleep(8)  # the last windows close (ingest heartbeats) and become servable
        sampler.done.set()
        sampler.join(timeout=30)
        assert sampler.error is None, sampler.error
        for name in ("stream", "ingest"):
            assert procs[name].poll() is None, logs[name].read_text()[-3000:]
        # Ctrl-C: ingest commits what it forwarded and exits (130, as after any Ctrl-C).
        assert stop(procs["ingest"], signal.SIGINT, 60) in (0, 130), logs["ingest"].read_text()
        time.sleep(3)  # the archiver reads the ingest's last records
        assert stop(procs["archive"], signal.SIGTERM, 60) == 0, logs["archive"].read_text()
        assert stop(procs["stream"], signal.SIGINT, 120) == 0, logs["stream"].read_text()
    finally:
        sampler.done.set()
        for proc in procs.values():
            stop(proc, signal.SIGTERM, 60)
        subprocess.run([SLUICE, "down"], env=env, capture_output=True, timeout=120, check=False)

    # Nothing lost, nothing counted twice: the archive (duplicates removed by event identity)
    # holds every event produced, once, although ingest and the archiver were killed.
    produced = logs["produce"].read_text()
    assert f"produced {RATE * PRODUCE_S} events" in produced, produced
    assert f"produced {RATE} events" in warm_up, warm_up
    for view in VIEWS:
        source = view.source
        counts = [re.search(rf"{source.name}\D+?(\d+)", text) for text in (produced, warm_up)]
        assert all(counts), (produced, warm_up)
        archived = read_history(settings.history_dir, source).num_rows
        total = sum(int(m.group(1)) for m in counts if m)
        assert archived == total, (source.name, archived, produced, warm_up)

    # Spark over the archive, under the same contract.
    from batch.backfill import backfill

    end = datetime.now(UTC)
    first_day = datetime.fromtimestamp(sampler.samples[0].t_ms / 1000 - 600, UTC).date()
    backfill(
        settings,
        list(VIEWS),
        first_day,
        end.date() + timedelta(days=1),
        spark=spark,
        now=end,
        materialize=False,
        show_progress=False,
    )
    samples = sampler.samples
    assert len(samples) >= 1000, len(samples)
    mismatches: list[tuple[Sample, dict[str, Any]]] = []
    busy = 0
    for view in VIEWS:
        mine = [s for s in samples if s.view == view.name]
        for sample, want in zip(mine, training_values(spark, settings, view, mine), strict=True):
            busy += any(v not in (0, 0.0, None) for v in want.values())
            if not all(same(sample.values[k], want[k]) for k in want):
                mismatches.append((sample, want))
    statuses = {status: sum(s.status is status for s in samples) for status in RowStatus}
    detail = "\n".join(f"{s}\n  training: {w}" for s, w in mismatches[:10])
    summary = f"{len(mismatches)} of {len(samples)} samples differ; statuses {statuses}\n{detail}"
    # Not a trivial comparison of empty windows: zones are always busy, restaurants often not.
    assert busy > len(samples) // 3, (busy, len(samples))

    # A value that differs from training's and is not flagged `behind` would be a silent
    # inconsistency: at most one in a thousand (events in flight at a boundary).
    unflagged = [m for m in mismatches if m[0].status is not RowStatus.BEHIND]
    assert len(unflagged) <= len(samples) // 1000, summary
    # The stream published its progress per view, and the choice used it.
    assert sampler.with_progress > len(samples) * 0.9, (sampler.with_progress, len(samples))
    flagged = [s for s in samples if s.status is RowStatus.BEHIND]
    quiet = sum(not outage_ms[0] <= s.t_ms <= outage_ms[1] for s in flagged)
    print(
        f"behind: {len(flagged)} of {len(samples)} samples ({quiet} outside the outage "
        f"{outage_ms}); mismatches {len(mismatches)}"
    )
    # Outside ingest's outage the stream keeps the contract: >= 99.9% equal row by row.
    outside = [s for s in samples if not outage_ms[0] <= s.t_ms <= outage_ms[1]]
    differ = [m for m in mismatches if not outage_ms[0] <= m[0].t_ms <= outage_ms[1]]
    assert len(outside) >= 1000, len(outside)
    assert len(differ) <= len(outside) // 1000, (
        f"outside the ingest outage {outage_ms}: {len(differ)} of {len(outside)} differ\n{summary}"
    )
