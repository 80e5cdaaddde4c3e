"""One SparkSession per process, configured for Sluice's semantics.

Starting Spark costs 6-16 s, so the session is created once and reused; ``stop_session`` ends
it (tests call it at the end of a run). Every setting that changes results is pinned here:
UTC session time zone (window ends are epoch-aligned instants, dates are UTC dates), dynamic
partition overwrite (a backfill replaces only the date partitions it writes) and parquet
timestamps as INT64 micros with the UTC flag (Spark's INT96 default reads back in pyarrow and
Feast as naive nanoseconds).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from core.settings import Settings
from core.settings_values import LOOPBACK_HOSTS
from core.shipping import code_archive
from core.uris import S3Options, spark_conf

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

# Few partitions for a local master: the default 200 makes every small shuffle pay for 200
# tasks; on 2 cores that dominates test and backfill times for days of data.
LOCAL_SHUFFLE_PARTITIONS = 8
LOCAL_DRIVER_MEMORY = "4g"

_lock = threading.Lock()
_session: SparkSession | None = None


def session_config(settings: Settings) -> dict[str, str]:
    """The Spark configuration Sluice runs with (before any ``extra`` overrides)."""
    local = settings.spark_master.startswith("local")
    config = {
        "spark.app.name": "sluice",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.sources.partitionOverwriteMode": "dynamic",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        # Aggregations below rely on ANSI semantics (errors, not silent nulls, on overflow).
        "spark.sql.ansi.enabled": "true",
        "spark.ui.showConsoleProgress": "false",
        # Plain-text driver logs: Spark 4's JSON log lines bury the one line that matters.
        "spark.log.structuredLogging.enabled": "false",
    }
    if settings.s3_endpoint:
        config |= spark_conf(S3Options.from_settings(settings))
    if not local and urlparse(settings.spark_master).hostname in LOOPBACK_HOSTS:
        # A standalone cluster on this machine (`sluice up --cluster`): executors reach the
        # driver on loopback; few shuffle partitions for few cores.
        config |= {
            "spark.sql.shuffle.partitions": str(LOCAL_SHUFFLE_PARTITIONS),
            "spark.driver.host": "127.0.0.1",
            "spark.driver.bindAddress": "127.0.0.1",
            "spark.ui.enabled": "false",
            "spark.executor.memory": "1g",
        }
    if local:
        config |= {
            "spark.sql.shuffle.partitions": str(LOCAL_SHUFFLE_PARTITIONS),
            "spark.driver.memory": LOCAL_DRIVER_MEMORY,
            # No web UI and loopback only: tests run in parallel without port or DNS surprises.
            "spark.ui.enabled": "false",
            "spark.driver.host": "127.0.0.1",
            "spark.driver.bindAddress": "127.0.0.1",
        }
    return config


def spark_session(settings: Settings, extra: Mapping[str, str] | None = None) -> SparkSession:
    """The process's SparkSession for ``settings.spark_master``, created on first use.

    Later calls return the same session (``extra`` only applies when it is created). Workers
    run this interpreter (PYSPARK_PYTHON): the engine uses no Python UDFs today, but a worker
    started with another Python would fail on the first one.
    """
    global _session
    with _lock:
        if _session is not None and not _is_stopped(_session):
            return _session
        from pyspark.sql import SparkSession

        if settings.spark_master.startswith("local"):
            os.environ["PYSPARK_PYTHON"] = sys.executable
            os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
            # A local session talks to itself only: bind to loopback, not the host's address.
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        else:  # a cluster's workers may have the venv elsewhere: respect what is set
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        builder = SparkSession.builder.master(settings.spark_master)
        for key, value in (session_config(settings) | dict(extra or {})).items():
            builder = builder.config(key, value)
        session = builder.getOrCreate()
        session.sparkContext.setLogLevel("ERROR")
        if not settings.spark_master.startswith("local"):
            # Executors run our Python (mapInPandas in `sluice score`) from the shipped code.
            code = code_archive(settings.state_dir / "spark", (settings.definitions_module,))
            session.sparkContext.addPyFile(str(code))
        _session = session
        return session


def stop_session() -> None:
    """Stop the process's session, if any; the next ``spark_session`` starts a new one."""
    global _session
    with _lock:
        if _session is not None:
            _session.stop()
            _session = None


def _is_stopped(session: SparkSession) -> bool:
    return bool(session.sparkContext._jsc is None or session.sparkContext._jsc.sc().isStopped())
