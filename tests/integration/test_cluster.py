"""The cluster stack (issue 15): `up --cluster` on loopback, then the live path on it.

One module fixture starts the object store, a Flink session cluster (JobManager + one
TaskManager from pyflink/bin) and a Spark standalone master + worker on free ports, beside the
session's broker and Redis; every test here runs against them:

- the stream job is submitted to the session cluster with its code shipped (python.files);
  the TaskManager is SIGKILLed once mid-run, a new one is started, and the job restores from
  its last checkpoint in the shared checkpoint storage; the rows it emits equal the reference;
- backfill, train and score run on the spark:// master, with the model registry in the
  object store (s3://); the cluster's scores equal local mode's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from batch.score import score
from batch.train import build_labels
from core.kafka import ensure_topics
from core.records import FeatureRow
from core.settings import Settings
from core.uris import S3Options, exists, parse
from examples.delivery.features import delivery_times, zone_couriers
from examples.delivery.produce import produce_synthetic
from examples.delivery.simulate import DeliverySimulator
from feature_repo.online_store import open_online_store
from features.definitions import FeatureView
from features.reference import compute_view, with_closing_rows
from features.registry import load_registry
from infra.cluster import (
    cluster_down,
    cluster_status,
    cluster_up,
    connection_settings,
    flink_checkpoints,
    flink_jobs,
    kill_taskmanager,
)
from infra.stack import free_port
from models.registry import ModelRegistry
from streaming.compile import compile_view, features_topic
from streaming.job import JobOptions, job_dir, job_name
from streaming.runner import run as run_stream
from tests.helpers.spark import isolated_settings, to_datetime, to_ms
from tests.helpers.stream import (
    PARTITIONS,
    START,
    Topic,
    closing_end,
    hand_made,
    read_all,
    row_differences,
)

pytestmark = [pytest.mark.integration, pytest.mark.flink, pytest.mark.spark, pytest.mark.slow]
SLUICE = str(Path(sys.executable).parent / "sluice")
BATCH_START = datetime(2026, 11, 10, 11, tzinfo=UTC)  # the lunch rush: busy windows


@pytest.fixture(scope="module")
def cluster(
    stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    state = tmp_path_factory.mktemp("cluster")
    settings = stack_settings.model_copy(
        update={
            "state_dir": state,
            "cluster_flink_rest_port": free_port(),
            "cluster_spark_master_port": free_port(),
            "cluster_spark_ui_port": free_port(),
            "cluster_spark_worker_ui_port": free_port(),
            "cluster_object_store_port": free_port(),
        }
    )
    try:
        cluster_up(settings)
        env = connection_settings(settings)
        yield settings.model_copy(
            update={
                "flink_jobmanager": env["SLUICE_FLINK_JOBMANAGER"],
                "spark_master": env["SLUICE_SPARK_MASTER"],
                "s3_endpoint": env["SLUICE_S3_ENDPOINT"],
                "s3_access_key": env["SLUICE_S3_ACCESS_KEY"],
                "s3_secret_key": env["SLUICE_S3_SECRET_KEY"],
                "models_dir": "s3://sluice/models",
                # Shared by the JobManager and TaskManagers (see docs/deployment.md for s3://).
                "flink_checkpoint_dir": (state / "shared" / "flink").as_uri(),
            }
        )
    finally:
        stopped = cluster_down(settings)
        assert "flink-jobmanager" in stopped


def test_cluster_answers_with_web_uis(cluster: Settings):
    rows = {r.component.name: r for r in cluster_status(cluster)}
    assert all(r.component.ready for r in rows.values()), rows
    assert rows["flink-taskmanager"].detail.endswith("slots free")
    assert rows["spark-worker"].detail.startswith(f"{cluster.cluster_spark_worker_cores} cores")
    for name in ("flink-jobmanager", "spark-master", "spark-worker"):
        with urllib.request.urlopen(rows[name].web_ui, timeout=5) as page:
            assert page.status == 200, name


def _row_online(settings: Settings, view: FeatureView, entity: str, end: int) -> bool:
    with open_online_store(settings) as store:
        row = store.read(view, [entity])[0]
    return row is not None and row.window_end_ms >= end


def test_stream_on_the_session_cluster_survives_a_taskmanager_kill(
    cluster: Settings, tmp_path: Path
):
    tag = f"c{uuid.uuid4().hex[:8]}"
    settings = cluster.model_copy(
        update={"dead_letter_topic": f"{tag}.dead-letter", "feast_project": tag}
    )
    source = zone_couriers.source.model_copy(update={"topic": f"{tag}.events.courier_pings"})
    view = zone_couriers.model_copy(update={"name": f"zone_couriers_{tag}", "source": source})
    ensure_topics(settings, [source.topic], partitions=PARTITIONS)
    topic = Topic(settings, source)
    lateness = int(source.allowed_lateness.total_seconds() * 1000)
    pings = (
        e for e in DeliverySimulator(seed=5, start_ms=START).events() if e.source == source.name
    )

    def produce_until(t_end: int) -> int:
        newest = START
        for event in pings:
            values = topic.canonical(event.payload).values
            topic.produce(values)
            newest = values[source.event_time_field]
            if newest >= t_end:
                break
        topic.flush()
        return newest

    # Phase A: 10 minutes of pings and a probe at minute 2 that closes at minute 13 - so the
    # probe's row is out only once phase B has been read (after the kill).
    probe_time = START + 2 * 60_000
    topic.produce(hand_made(source, probe_time, "z-probe"))
    produce_until(START + 10 * 60_000)
    checkpoints = job_dir(settings, [compile_view(view)])
    assert str(checkpoints).startswith(settings.flink_checkpoint_dir)
    final: dict[str, int] = {}
    seen: dict[str, Any] = {"killed": None, "restored": None, "job": None}

    def orchestrate() -> bool:
        """Called by the runner's loop: kill the TaskManager once a checkpoint holds phase A,
        start a new one, produce phase B, stop when its last row is online."""
        if seen["job"] is None:
            running = [
                j
                for j in flink_jobs(settings)
                if j["state"] == "RUNNING" and j["name"] == job_name([compile_view(view)])
            ]
            seen["job"] = running[0]["jid"] if running else None
            return False
        stats = flink_checkpoints(settings, seen["job"])
        if seen["killed"] is None:
            if stats["counts"]["completed"] >= 2:
                seen["killed"] = kill_taskmanager(settings)
                cluster_up(settings)  # a new TaskManager registers with the JobManager
            return False
        if seen["restored"] is None:
            seen["restored"] = stats["latest"]["restored"]
            if seen["restored"] is not None:
                newest = produce_until(START + 20 * 60_000)
                final["end"] = closing_end(view, newest)
                final["probe"] = final["end"] - view.max_window.size_ms - view.slide_ms
                topic.produce(hand_made(source, final["probe"], "z-final"))
                for p in range(PARTITIONS):
                    topic.produce(hand_made(source, final["end"] + lateness, f"z-end-{p}"), p)
                topic.flush()
            return False
        return _row_online(settings, view, "z-final", final["end"])

    lines: list[str] = []
    started = time.monotonic()
    report = run_stream(
        settings,
        [view],
        options=JobOptions(
            jobmanager=settings.flink_jobmanager,
            checkpoint_interval_s=2,
            restart_attempts=10,
        ),
        echo=lines.append,
        report_every_s=5,
        should_stop=lambda: time.monotonic() - started > 240 or orchestrate(),
    )
    assert seen["killed"] is not None, lines
    assert seen["restored"] is not None, "the job did not restore a checkpoint after the kill"
    # Flink writes file:/abs; parse() reads it as the same location.
    restored = parse(seen["restored"]["external_path"])
    assert restored.path.startswith(f"{checkpoints.path}/checkpoints/"), (restored, checkpoints)
    assert report.status == "STOPPED", lines
    assert report.savepoint is not None
    assert parse(report.savepoint).path.startswith(f"{checkpoints.path}/savepoints/")
    assert exists(parse(report.savepoint).join("_metadata"))

    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    listed = _sluice(config, "jobs")
    assert job_name([compile_view(view)]) in listed
    assert "FINISHED" in listed

    want = {
        k: v
        for k, v in with_closing_rows(view, compute_view(view, topic.events)).items()
        if k[1] <= final["end"]
    }
    got: dict[tuple[str, int], Any] = {}
    for msg in read_all(settings, features_topic(view.name)):
        row = FeatureRow.decode(msg.value())
        key = (row.entity_key, row.window_end_ms)
        # Rows emitted after the last checkpoint before the kill are emitted again: equal.
        assert key not in got or got[key] == row.values, key
        got[key] = row.values
    assert row_differences(got, want) == []
    assert ("z-probe", closing_end(view, probe_time)) in got


def _sluice(config: Path, *args: str) -> str:
    began = time.monotonic()
    proc = subprocess.run(
        [SLUICE, "--config", str(config), *args],
        env=os.environ | {"COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, f"sluice {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    print(f"sluice {args[0]}: {time.monotonic() - began:.1f} s")  # shown with -s
    return proc.stdout


def _spark_apps(settings: Settings) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{settings.cluster_spark_ui_port}/json/"
    with urllib.request.urlopen(url, timeout=5) as page:
        master = json.loads(page.read())
    return list(master["completedapps"]) + list(master["activeapps"])


def _sluice_session(config: Path, *commands: list[str]) -> None:
    """Run sluice commands one after the other in one subprocess (cli.main.run each)."""
    script = (
        "import sys, json, time\n"
        "from cli.main import run\n"
        "for args in json.loads(sys.argv[2]):\n"
        "    began = time.monotonic()\n"
        "    code = run(['--config', sys.argv[1], *args])\n"
        "    print(f'sluice {args[0]}: {time.monotonic() - began:.1f} s', flush=True)\n"
        "    if code:\n"
        "        sys.exit(code)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(config), json.dumps(commands)],
        env=os.environ | {"COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )
    assert proc.returncode == 0, f"{commands}:\n{proc.stdout}\n{proc.stderr}"
    print(proc.stdout)  # shown with -s: what each command said and took


def test_backfill_train_and_score_on_the_spark_master(
    cluster: Settings, spark: Any, tmp_path: Path
):
    """`sluice backfill`, `train` and `score` (the CLI, in a subprocess) on spark://, the model
    registry in the object store; `score` on the cluster equals `score` in local mode."""
    settings = isolated_settings(
        cluster,
        tmp_path,
        "cluster_batch",
        spark_master=cluster.spark_master,
        models_dir="s3://sluice/models-batch",
        serve_models=["delivery_eta"],
    )
    report = produce_synthetic(
        settings,
        5000,
        start_ms=to_ms(BATCH_START),
        to_kafka=False,
        history_dir=settings.history_dir,
    )
    first = to_datetime(report.first_event_ms).date() - timedelta(days=1)
    last = to_datetime(report.last_event_ms).date() + timedelta(days=2)
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    apps_before = len(_spark_apps(settings))

    definitions = load_registry(settings.definitions_module)
    labels = build_labels(settings, definitions, delivery_times).frame  # from the history
    rows = labels.sort_values("event_timestamp", kind="stable").iloc[-300:].copy()
    rows["row_id"] = [f"r{i}" for i in range(len(rows))]
    columns = ["row_id", "restaurant_id", "zone_id", "distance_km", "hour_of_day", "items"]
    rows_file = str(tmp_path / "rows.parquet")
    rows[[*columns, "event_timestamp"]].to_parquet(rows_file)

    # Three commands in one process, as a scheduler's script would run them: one Spark
    # application on the master (a standalone app's executors cost seconds to start).
    _sluice_session(
        config,
        ["backfill", "--start", first.isoformat(), "--end", last.isoformat()],
        ["train", "--rounds", "20"],
        ["score", rows_file, str(tmp_path / "on-cluster"), "--predictor", "native"],
    )
    apps = _spark_apps(settings)
    assert len(apps) == apps_before + 1, "the commands ran as an application on the master"
    assert all(app["name"] == "sluice" for app in apps)
    assert any(settings.offline_store_dir.rglob("*.parquet"))
    s3 = S3Options.from_settings(settings)
    assert ModelRegistry(settings.models_dir, s3).production("delivery_eta") == 1
    assert exists("s3://sluice/models-batch/delivery_eta/1/model.txt", s3)

    # The same rows scored in local mode, in this process (the session's local Spark).
    local = settings.model_copy(update={"spark_master": "local[2]"})
    score(local, rows_file, str(tmp_path / "in-local"), predictor="native", spark=spark)
    on_cluster = pd.read_parquet(tmp_path / "on-cluster").set_index("row_id").sort_index()
    in_local = pd.read_parquet(tmp_path / "in-local").set_index("row_id").sort_index()
    assert len(on_cluster) == len(rows) == len(in_local)
    assert on_cluster["prediction"].notna().all()
    assert np.allclose(on_cluster["prediction"], in_local["prediction"], rtol=1e-12, atol=0)
