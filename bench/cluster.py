"""A `sluice up --cluster` stack of a benchmark's own (free loopback ports, a temporary state
dir), for bench.backfill --cluster and bench.stream's tiles-cluster job: cluster mode against
local mode in one run."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.settings import Settings
from infra.cluster import cluster_down, cluster_up, connection_settings
from infra.stack import free_port


@contextmanager
def own_cluster(base: Settings, prefix: str, **storage: Any) -> Iterator[Settings]:
    """``base`` pointed at a cluster started for the block: Flink session cluster, Spark
    standalone, object store with its bucket mounted; checkpoints in ``s3://sluice/<prefix>``
    and ``storage`` (e.g. ``history_dir="s3://sluice/..."``) validated as settings are."""
    state = Path(tempfile.mkdtemp(prefix="sluice-bench-cluster-"))
    settings = base.model_copy(
        update={
            "state_dir": state,
            "cluster_flink_rest_port": free_port(),
            "cluster_spark_master_port": free_port(),
            "cluster_spark_ui_port": free_port(),
            "cluster_spark_worker_ui_port": free_port(),
            "cluster_object_store_port": free_port(),
        }
    )
    began = time.monotonic()
    try:
        cluster_up(settings)
        print(f"cluster up in {time.monotonic() - began:.1f} s (state in {state})", flush=True)
        env = connection_settings(settings)
        update = {
            "flink_jobmanager": env["SLUICE_FLINK_JOBMANAGER"],
            "spark_master": env["SLUICE_SPARK_MASTER"],
            "s3_endpoint": env["SLUICE_S3_ENDPOINT"],
            "s3_access_key": env["SLUICE_S3_ACCESS_KEY"],
            "s3_secret_key": env["SLUICE_S3_SECRET_KEY"],
            "s3_mount_dir": env["SLUICE_S3_MOUNT_DIR"],
            "flink_checkpoint_dir": f"s3://sluice/{prefix}/flink",
            **storage,
        }
        yield Settings.model_validate(settings.model_dump() | update)
    finally:
        cluster_down(settings)
        shutil.rmtree(state, ignore_errors=True)
