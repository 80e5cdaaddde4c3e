"""The cluster stack (issue 15): `up --cluster` on loopback, then the live path on it, with
every shared location in the object store.

One module fixture starts the object store, its bucket mounted with s3fs, a Flink session
cluster (JobManager + one TaskManager from pyflink/bin) and a Spark standalone master + worker
on free ports, beside the session's broker and Redis. The settings name s3:// for the
checkpoints and savepoints, the history, the offline store and the model registry; Python
reaches the registry and the checkpoint listing through S3, the JVM engines reach everything
through the mount (s3_mount_dir, core/uris.JvmAccess). Every test here runs against them:

- the stream job is submitted to the session cluster with its code shipped (python.files);
  the TaskManager is SIGKILLed once mid-run, a new one is started, and the job restores a
  checkpoint that was an object in the bucket when the TaskManager died (listed through S3,
  not the mount); the rows it emits equal the reference (test_flink_parity's check);
- the live path writes the history: events produced out of time order to raw topics of the
  test's own, `sluice ingest` and `sluice archive` (subprocesses) validate them and archive
  them into history_dir = s3://..., through the mount; the archive's parts are listed through
  S3 as objects in the bucket, every event once;
- backfill, train and score run on the spark:// master: the backfill reads that archived
  history from s3:// and writes the offline store to s3://, whose rows equal the reference
  computed from the produced events exactly as test_spark_parity's backfill check demands
  (its helpers, not a copy); the model registry is in s3://; the cluster's scores equal
  local mode's; `sluice serve` loads the model from the bucket and answers a prediction with
  the rows the backfill materialized online.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
import yaml

from batch.offline_store import read_offline
from batch.score import score
from batch.train import build_labels
from core.kafka import CountingProducer, ensure_topics
from core.settings import Settings
from core.uris import JvmAccess, S3Options, StorageUri, exists, filesystem, parse
from events.history import SourceEvent, parse_part_name, read_history
from examples.delivery.features import VIEWS, delivery_times
from examples.delivery.simulate import DeliverySimulator
from examples.delivery.sources import SOURCES
from features.registry import load_registry
from infra import object_store
from infra.cluster import (
    cluster_down,
    cluster_status,
    cluster_up,
    connection_settings,
    kill_taskmanager,
)
from infra.flink_jobs import flink_checkpoints, flink_jobs
from models.registry import ModelRegistry
from streaming.compile import compile_view
from streaming.job import JobOptions, job_dir, job_name
from streaming.runner import run as run_stream
from tests.helpers.cluster_stack import (
    CourierStream,
    cluster_ports,
    row_is_online,
    tagged_sources,
    with_storage,
)
from tests.helpers.pipeline import background, sluice_env, stop
from tests.helpers.serve_process import ServeProcess
from tests.helpers.spark import canonical, isolated_settings
from tests.helpers.stream import START, closing_end, hand_made, row_differences
from tests.integration.test_spark_parity import (
    DAY,
    DAY0,
    DAY0_MS,
    HOUR,
    TINY_CITY,
    arrow_rows,
    assert_same_rows,
    in_range,
    reference_rows,
    until,
)

pytestmark = [pytest.mark.integration, pytest.mark.flink, pytest.mark.spark, pytest.mark.slow]
SLUICE = str(Path(sys.executable).parent / "sluice")


@pytest.fixture(scope="module")
def cluster(
    stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    settings = cluster_ports(stack_settings, tmp_path_factory.mktemp("cluster"))
    try:
        cluster_up(settings)
        env = connection_settings(settings)
        yield with_storage(
            settings,
            flink_jobmanager=env["SLUICE_FLINK_JOBMANAGER"],
            spark_master=env["SLUICE_SPARK_MASTER"],
            s3_endpoint=env["SLUICE_S3_ENDPOINT"],
            s3_access_key=env["SLUICE_S3_ACCESS_KEY"],
            s3_secret_key=env["SLUICE_S3_SECRET_KEY"],
            s3_mount_dir=env["SLUICE_S3_MOUNT_DIR"],
            models_dir="s3://sluice/models",
            flink_checkpoint_dir="s3://sluice/flink",
        )
    finally:
        stopped = cluster_down(settings)
        assert "flink-jobmanager" in stopped
        assert "object-store-mount" in stopped
        assert not object_store.is_mounted(object_store.mount_point(settings))


def test_cluster_answers_with_web_uis_and_mounts_the_bucket(cluster: Settings):
    rows = {r.component.name: r for r in cluster_status(cluster)}
    assert all(r.component.ready for r in rows.values()), rows
    assert rows["flink-taskmanager"].detail.endswith("slots free")
    assert rows["spark-worker"].detail.startswith(f"{cluster.cluster_spark_worker_cores} cores")
    assert rows["object-store-mount"].web_ui == str(Path(cluster.s3_mount_dir) / "sluice")
    for name in ("flink-jobmanager", "spark-master", "spark-worker"):
        with urllib.request.urlopen(rows[name].web_ui, timeout=5) as page:
            assert page.status == 200, name


def _snapshots_in_bucket(root: StorageUri, s3: S3Options) -> set[StorageUri]:
    """Checkpoint and savepoint directories under ``root`` whose _metadata is an object in the
    bucket, listed through S3 (not the mount)."""
    fs, path = filesystem(root, s3)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    return {
        root.join(info.path[len(path) :].strip("/").rsplit("/", 1)[0])
        for info in fs.get_file_info(selector)
        if info.base_name == "_metadata" and info.type == pafs.FileType.File
    }


def test_stream_on_the_session_cluster_restores_a_checkpoint_from_the_bucket(
    cluster: Settings, tmp_path: Path
):
    case = CourierStream.create(cluster, "c", seed=5)
    settings, view = case.settings, case.view
    s3, jvm = S3Options.from_settings(settings), JvmAccess.from_settings(settings)
    # Phase A: 10 minutes of pings and a probe at minute 2 that closes at minute 13 - so the
    # probe's row is out only once phase B has been read (after the kill).
    probe_time = START + 2 * 60_000
    case.topic.produce(hand_made(case.source, probe_time, "z-probe"))
    case.produce_until(START + 10 * 60_000)
    checkpoints = job_dir(settings, [compile_view(view)])
    assert str(checkpoints).startswith("s3://sluice/flink/")
    final: dict[str, int] = {}
    seen: dict[str, Any] = {"killed": None, "restored": None, "job": None, "in_bucket": set()}

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
                # Listed now, not at the kill: a checkpoint every task had acknowledged before
                # the kill still completes afterwards (the JobManager writes its _metadata).
                seen["in_bucket"] = _snapshots_in_bucket(checkpoints, s3)
                final["end"], _ = case.close_windows(case.produce_until(START + 20 * 60_000))
            return False
        return row_is_online(settings, view, "z-final", final["end"])

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
    # Flink names it file:/<mount>/sluice/...; as the settings name it, it is an s3:// URI.
    restored = jvm.from_engine(seen["restored"]["external_path"])
    assert restored.path.startswith(f"{checkpoints.path}/checkpoints/"), (restored, checkpoints)
    assert restored in seen["in_bucket"], (restored, seen["in_bucket"])
    assert report.status == "STOPPED", lines
    assert report.savepoint is not None
    savepoint = parse(report.savepoint)
    assert savepoint.path.startswith(f"{checkpoints.path}/savepoints/"), savepoint
    assert savepoint in _snapshots_in_bucket(checkpoints, s3)

    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    listed = _sluice(config, "jobs")
    assert job_name([compile_view(view)]) in listed
    assert "FINISHED" in listed

    got = case.emitted()
    # On a difference, the counts say whether an event was dead-lettered (late: after the
    # restore, a partition's first records may come behind the restored watermark) or lost.
    counts = report.views[view.name].cumulative()
    assert row_differences(got, case.reference(final["end"])) == [], (counts, lines[-6:])
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


def test_backfill_train_and_score_on_the_spark_master_with_storage_in_the_bucket(
    cluster: Settings, spark: Any, tmp_path: Path
):
    """`sluice backfill`, `train` and `score` (the CLI, in a subprocess) on spark://, with the
    history, the offline store and the model registry at s3:// URIs: the offline store equals
    the reference (test_spark_parity's backfill check), and `score` on the cluster equals
    `score` in local mode."""
    tag = f"b{uuid.uuid4().hex[:8]}"
    settings = with_storage(
        isolated_settings(
            cluster,
            tmp_path,
            "cluster_batch",
            spark_master=cluster.spark_master,
            serve_models=["delivery_eta"],
        ),
        history_dir=f"s3://sluice/{tag}/history",
        offline_store_dir=f"s3://sluice/{tag}/offline",
        models_dir=f"s3://sluice/{tag}/models",
    )
    s3 = S3Options.from_settings(settings)
    # test_spark_parity's events, one day (plus the 6 hours its windows reach back), out of
    # time order, through the live path: raw topics, `sluice ingest`, `sluice archive` into
    # the history at s3://, which the archive writes through the mount.
    sim = DeliverySimulator(seed=21, start_ms=DAY0_MS - 6 * HOUR, city=TINY_CITY)
    events = until(sim, DAY0_MS + DAY + 8 * HOUR)
    random.Random(5).shuffle(events)
    _ingest_and_archive(settings, tag, tmp_path, events)
    # The archive's parts are objects in the bucket (listed through S3, not the mount), and
    # they hold every event once.
    for source in SOURCES:
        parts = _objects(f"s3://sluice/{tag}/history/{source.name}", s3, ".parquet")
        assert parts, source.name
        names = [parse_part_name(p.rsplit("/", 1)[1]) for p in parts]
        assert all(n is not None and n.topic == f"{tag}.events.{source.name}" for n in names)
        fs, _ = filesystem("s3://sluice/", s3)
        in_bucket = pads.dataset(parts, filesystem=fs, format="parquet").count_rows()
        assert in_bucket == sum(e.source == source.name for e in events), source.name
    assert _objects(f"s3://sluice/{tag}/history", s3, ".tmp") == [], "a temporary part was left"
    by_source = {
        s.name: [canonical(s, e.payload) for e in events if e.source == s.name] for s in SOURCES
    }
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    assert "s3_mount_dir" in config.read_text()
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
    end = DAY0 + timedelta(days=1)
    _sluice_session(
        config,
        ["backfill", "--start", DAY0.isoformat(), "--end", end.isoformat()],
        ["train", "--rounds", "20"],
        ["score", rows_file, str(tmp_path / "on-cluster"), "--predictor", "native"],
    )
    apps = _spark_apps(settings)
    assert len(apps) == apps_before + 1, "the commands ran as an application on the master"
    assert all(app["name"] == "sluice" for app in apps)

    # The offline store is objects in the bucket, and its rows are the reference's.
    fs, _ = filesystem("s3://sluice/", s3)
    for view in VIEWS:
        expected = in_range(
            reference_rows(view, by_source[view.source.name]), DAY0_MS, DAY0_MS + DAY
        )
        where = parse(f"s3://sluice/{tag}/offline").join(view.name)
        assert _objects(str(where), s3, ".parquet"), view.name
        in_bucket = pads.dataset(
            where.for_python(), filesystem=fs, format="parquet", partitioning="hive"
        )
        assert in_bucket.count_rows() == len(expected), view.name
        assert_same_rows(view, expected, arrow_rows(view, read_offline("pyarrow", settings, view)))
    assert ModelRegistry(settings.models_dir, s3).production("delivery_eta") == 1
    assert exists(f"s3://sluice/{tag}/models/delivery_eta/1/model.txt", s3)

    # `sluice serve` loads the production model from the registry in the bucket and answers
    # with the feature rows the backfill materialized online.
    answer = _predict_once(settings, tag, tmp_path, rows.iloc[-1][columns[1:]].to_dict())
    assert (answer["model"], answer["model_version"]) == ("delivery_eta", 1)
    assert math.isfinite(answer["prediction"])
    assert answer["window_ends_ms"]["restaurant_orders"] is not None, answer

    # The same rows scored in local mode, in this process (the session's local Spark).
    local = settings.model_copy(update={"spark_master": "local[2]"})
    score(local, rows_file, str(tmp_path / "in-local"), predictor="native", spark=spark)
    on_cluster = pd.read_parquet(tmp_path / "on-cluster").set_index("row_id").sort_index()
    in_local = pd.read_parquet(tmp_path / "in-local").set_index("row_id").sort_index()
    assert len(on_cluster) == len(rows) == len(in_local)
    assert on_cluster["prediction"].notna().all()
    assert np.allclose(on_cluster["prediction"], in_local["prediction"], rtol=1e-12, atol=0)


def _ingest_and_archive(
    settings: Settings, tag: str, tmp_path: Path, events: list[SourceEvent]
) -> None:
    """The live path into the history: ``events`` as raw JSON on raw topics of the test's own,
    `sluice ingest` validating them onto its events topics and `sluice archive` beside it
    writing them into ``settings.history_dir`` (an s3:// URI, files under the mount). Returns
    once the history holds every event and both processes have exited cleanly."""
    module = tagged_sources(tmp_path, tag)
    sources = load_registry(module.__name__).sources
    ensure_topics(settings, [s.raw_topic for s in sources.values()])
    producer = CountingProducer(settings)
    for event in events:
        raw = orjson.dumps(event.payload)
        producer.produce(sources[event.source].raw_topic, raw, event.key, event.event_time_ms)
    assert producer.flush().delivered == len(events)
    env = sluice_env(
        settings,
        module,
        SLUICE_DEAD_LETTER_TOPIC=f"{tag}.dead-letter",
        SLUICE_S3_MOUNT_DIR=settings.s3_mount_dir,
        SLUICE_HISTORY_DIR=f"s3://sluice/{tag}/history",
    )
    logs = {name: tmp_path / f"{name}.log" for name in ("ingest", "archive")}
    expected = Counter(e.source for e in events)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    began = time.monotonic()
    try:
        procs["archive"] = background(env, logs["archive"], "archive", "--flush-seconds", "1")
        procs["ingest"] = background(
            env, logs["ingest"], "ingest", "--idle-timeout", "3", "--group", f"{tag}-ingest"
        )
        assert procs["ingest"].wait(timeout=120) == 0, logs["ingest"].read_text()
        n = len(events)
        assert f"{n} in = {n} valid + 0 dead-lettered" in logs["ingest"].read_text()
        deadline = time.monotonic() + 90
        while (
            Counter({s: read_history(settings.history_dir, sources[s]).num_rows for s in expected})
            != expected
        ):
            assert procs["archive"].poll() is None, logs["archive"].read_text()
            assert time.monotonic() < deadline, logs["archive"].read_text()
            time.sleep(1)
        assert stop(procs["archive"], signal.SIGTERM, 60) == 0, logs["archive"].read_text()
        # Every record it read was an event or ingest's heartbeat: none was skipped as invalid.
        archived = logs["archive"].read_text()
        assert f"{n} archived + 0 late marks" in archived, archived
        assert "not_canonical" not in archived, archived
    finally:
        for proc in procs.values():
            stop(proc, signal.SIGTERM, 30)
    print(f"ingest + archive of {len(events)} events: {time.monotonic() - began:.1f} s")


def _predict_once(
    settings: Settings, tag: str, tmp_path: Path, row: dict[Any, Any]
) -> dict[str, Any]:
    """One /predict of ``row`` from a `sluice serve` subprocess pointed at the bucket."""
    env = {
        "SLUICE_MODELS_DIR": settings.models_dir,
        "SLUICE_S3_ENDPOINT": settings.s3_endpoint,
        "SLUICE_S3_ACCESS_KEY": settings.s3_access_key,
        "SLUICE_S3_SECRET_KEY": settings.s3_secret_key,
        "SLUICE_S3_MOUNT_DIR": settings.s3_mount_dir,
        "SLUICE_OFFLINE_STORE_DIR": f"s3://sluice/{tag}/offline",
        "SLUICE_FEAST_PROJECT": settings.feast_project,
        "SLUICE_FEAST_REGISTRY": str(settings.feast_registry),
        "SLUICE_DEFINITIONS_MODULE": settings.definitions_module,
        "SLUICE_SERVE_MODELS": "delivery_eta",
        "SLUICE_PREDICTION_TOPIC": f"{tag}.predictions",
        "SLUICE_FEEDBACK_TOPIC": f"{tag}.feedback",
    }
    server = ServeProcess(settings, tmp_path / "prediction-log", tmp_path / "serve.log", env)
    try:
        server.wait_ready()
        plain = {str(k): v.item() if hasattr(v, "item") else v for k, v in row.items()}
        answer: dict[str, Any] = server.post("/predict", {"rows": [plain]})["predictions"][0]
    finally:
        server.stop()
    return answer


def _objects(where: str, s3: S3Options, suffix: str) -> list[str]:
    """Keys of the objects under ``where`` ending in ``suffix``, listed through S3."""
    fs, path = filesystem(where, s3)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    return [
        i.path
        for i in fs.get_file_info(selector)
        if i.type == pafs.FileType.File and i.path.endswith(suffix)
    ]
