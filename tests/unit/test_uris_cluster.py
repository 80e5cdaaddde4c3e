"""infra/cluster.py without starting anything: what `up --cluster` would run, and where."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import StackError
from core.settings import load_settings
from infra.cluster import cluster_up, connection_settings, plan
from infra.stack import load_records


def test_plan_binds_loopback_and_sizes_for_two_cores(tmp_path: Path):
    settings = load_settings(state_dir=tmp_path, cluster_flink_rest_port=18181)
    components = {c.name: c for c in plan(settings, rpc_port=16123)}
    assert list(components) == [
        "object-store",
        "object-store-mount",
        "flink-jobmanager",
        "flink-taskmanager",
        "spark-master",
        "spark-worker",
    ]
    assert all(c.host == "127.0.0.1" for c in components.values())
    conf_dir = Path(components["flink-jobmanager"].env["FLINK_CONF_DIR"])
    conf = dict(line.split(": ", 1) for line in (conf_dir / "config.yaml").read_text().splitlines())
    assert conf["rest.port"] == "18181"
    assert conf["jobmanager.rpc.port"] == "16123"
    assert conf["rest.bind-address"] == '"127.0.0.1"'
    assert conf["taskmanager.memory.process.size"] == '"1600m"'
    assert conf["s3.endpoint"] == '"http://127.0.0.1:9000"'
    mount = components["object-store-mount"].command
    assert mount[1:4] == ["sluice", str(tmp_path / "cluster" / "s3" / "sluice"), "-f"]
    assert "stat_cache_expire=1" in mount[-1]
    assert "sluice-local-secret" not in " ".join(mount)  # the keys are in a 0600 file
    worker = components["spark-worker"].command
    assert worker[worker.index("--cores") + 1] == "2"
    assert worker[worker.index("--memory") + 1] == "2g"
    assert "spark://127.0.0.1:7077" in worker


def test_connection_settings_point_at_what_is_started(tmp_path: Path):
    settings = load_settings(
        state_dir=tmp_path, cluster_spark_master_port=17177, s3_endpoint="http://127.0.0.1:19999"
    )
    env = connection_settings(settings)
    assert env["SLUICE_SPARK_MASTER"] == "spark://127.0.0.1:17177"
    assert env["SLUICE_FLINK_JOBMANAGER"] == "127.0.0.1:8081"
    assert env["SLUICE_S3_ENDPOINT"] == "http://127.0.0.1:19999"
    assert env["SLUICE_S3_MOUNT_DIR"] == str(tmp_path / "cluster" / "s3")
    mounted = load_settings(state_dir=tmp_path, s3_mount_dir="/mnt/s3")
    assert connection_settings(mounted)["SLUICE_S3_MOUNT_DIR"] == "/mnt/s3"
    # Set addresses win over the cluster_* ports.
    pinned = load_settings(state_dir=tmp_path, flink_jobmanager="127.0.0.1:28081")
    assert connection_settings(pinned)["SLUICE_FLINK_JOBMANAGER"] == "127.0.0.1:28081"


def test_up_refuses_non_loopback_addresses_before_starting_anything(tmp_path: Path):
    settings = load_settings(state_dir=tmp_path, spark_master="spark://spark.internal:7077")
    with pytest.raises(
        StackError, match=r"spark-master is set to spark\.internal:7077, not loopback"
    ):
        cluster_up(settings)
    assert load_records(tmp_path, "cluster.json") == {}
