"""`sluice up --cluster`: a Flink session cluster, a Spark standalone cluster and an object store.

All on loopback, sized for a 2-core machine, recorded in ``<state_dir>/cluster.json`` beside
the local stack's ``stack.json`` so that ``down`` stops exactly these pids:

- object-store: S3-compatible (infra/object_store.py) at s3_endpoint or
  127.0.0.1:cluster_object_store_port, with the bucket ``sluice``;
- object-store-mount: s3fs mounting that bucket at ``<s3_mount_dir>/sluice`` (default
  ``<state_dir>/cluster/s3/sluice``), through which Flink and Spark reach s3:// locations
  (core/uris.JvmAccess): checkpoints, savepoints, the history and the offline store;
- flink-jobmanager, flink-taskmanager: the apache-flink package's own scripts
  (``pyflink/bin/jobmanager.sh start-foreground``, ``taskmanager.sh start-foreground``) with a
  generated configuration dir; REST and web UI at flink_jobmanager or
  127.0.0.1:cluster_flink_rest_port;
- spark-master, spark-worker: ``spark-class org.apache.spark.deploy.master.Master`` and
  ``...worker.Worker`` from pyspark, master at spark_master or
  spark://127.0.0.1:cluster_spark_master_port.

``connection_settings`` gives the SLUICE_* values that point every command at it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from core.errors import StackError
from core.settings import Settings
from core.settings_values import LOOPBACK_HOSTS
from core.uris import flink_conf
from infra import object_store
from infra.stack import (
    _CHILDREN,
    ComponentStatus,
    ProcessRecord,
    _event,
    _gone,
    _is_ours,
    _locked,
    _log_tail,
    _port_answers,
    _stop,
    _wait_until,
    free_port,
    load_records,
    save_records,
)

log = logging.getLogger("sluice.cluster")

STATE_FILE = "cluster.json"
COMPONENTS = (
    "object-store",
    object_store.MOUNT_COMPONENT,
    "flink-jobmanager",
    "flink-taskmanager",
    "spark-master",
    "spark-worker",
)
PROBE_TIMEOUT_S = 2.0
# JVMs on a busy 2-core machine: a JobManager takes 5-15 s, a TaskManager registers after.
_JVM_STARTUP_S = 90.0


@dataclass(frozen=True)
class Component:
    name: str
    host: str
    port: int  # what the probe connects to
    command: list[str]
    binary: str  # the program the pid runs (scripts exec java)
    env: dict[str, str] = field(default_factory=dict)
    web_ui: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ClusterStatus:
    component: ComponentStatus
    web_ui: str
    detail: str  # "2 slots", "1 worker", ...


def _flink_home() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pyflink")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("apache-flink is not installed (pyflink/bin holds the cluster scripts)")
    return Path(next(iter(spec.submodule_search_locations)))


def _spark_home() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pyspark")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("pyspark is not installed (it holds spark-class)")
    return Path(next(iter(spec.submodule_search_locations)))


def flink_rest(settings: Settings) -> tuple[str, int]:
    if settings.flink_jobmanager:
        host, _, port = settings.flink_jobmanager.rpartition(":")
        return host, int(port)
    return "127.0.0.1", settings.cluster_flink_rest_port


def spark_master(settings: Settings) -> tuple[str, int]:
    if settings.spark_master.startswith("spark://"):
        parsed = urlparse(settings.spark_master)
        return parsed.hostname or "127.0.0.1", parsed.port or 7077
    return "127.0.0.1", settings.cluster_spark_master_port


def connection_settings(settings: Settings) -> dict[str, str]:
    """SLUICE_* variables that point every command at the cluster this module starts."""
    fhost, fport = flink_rest(settings)
    shost, sport = spark_master(settings)
    s3 = object_store.options(settings)
    return {
        "SLUICE_FLINK_JOBMANAGER": f"{fhost}:{fport}",
        "SLUICE_SPARK_MASTER": f"spark://{shost}:{sport}",
        "SLUICE_S3_ENDPOINT": s3.endpoint,
        "SLUICE_S3_ACCESS_KEY": s3.access_key,
        "SLUICE_S3_SECRET_KEY": s3.secret_key,
        "SLUICE_S3_MOUNT_DIR": str(object_store.mount_root(settings)),
    }


def _cluster_dir(settings: Settings) -> Path:
    return settings.state_dir / "cluster"


def _flink_conf_dir(settings: Settings, rpc_port: int) -> Path:
    """A Flink configuration dir for this cluster: loopback, small memory, our Python."""
    home = _flink_home()
    conf_dir = _cluster_dir(settings) / "flink-conf"
    conf_dir.mkdir(parents=True, exist_ok=True)
    host, rest_port = flink_rest(settings)
    conf: dict[str, Any] = {
        "jobmanager.rpc.address": host,
        "jobmanager.rpc.port": rpc_port,
        "jobmanager.bind-host": host,
        "rest.address": host,
        "rest.bind-address": host,
        "rest.port": rest_port,
        "taskmanager.host": host,
        "taskmanager.bind-host": host,
        "taskmanager.numberOfTaskSlots": settings.cluster_flink_slots,
        "jobmanager.memory.process.size": settings.cluster_flink_jobmanager_memory,
        "taskmanager.memory.process.size": settings.cluster_flink_taskmanager_memory,
        "parallelism.default": 1,
        "python.executable": sys.executable,
        "state.backend.type": "hashmap",
        "env.log.dir": str(_cluster_dir(settings) / "flink-logs"),
        # A lost TaskManager is noticed in seconds, not the default 50 s.
        "heartbeat.timeout": 10000,
        "heartbeat.interval": 2000,
    }
    conf |= flink_conf(object_store.options(settings))
    (conf_dir / "config.yaml").write_text(
        "".join(f"{key}: {json.dumps(value)}\n" for key, value in conf.items())
    )
    for name in ("log4j-console.properties", "log4j.properties", "logback-console.xml"):
        if (home / "conf" / name).is_file():
            shutil.copy(home / "conf" / name, conf_dir / name)
    return conf_dir


def plan(settings: Settings, rpc_port: int | None = None) -> list[Component]:
    """What `up --cluster` runs, in start order."""
    java = shutil.which("java")
    if java is None:
        raise StackError("java is not on PATH: apt-get install openjdk-17-jre-headless")
    base = _cluster_dir(settings)
    s3_host, s3_port = object_store.endpoint(settings)
    fhost, fport = flink_rest(settings)
    shost, sport = spark_master(settings)
    flink_bin = _flink_home() / "bin"
    spark_class = str(_spark_home() / "bin" / "spark-class")
    conf_dir = _flink_conf_dir(settings, rpc_port or free_port(fhost))
    flink_env = {
        "FLINK_CONF_DIR": str(conf_dir),
        "FLINK_LOG_DIR": str(base / "flink-logs"),
        "FLINK_PLUGINS_DIR": str(base / "flink-plugins"),
    }
    spark_env = {
        "SPARK_HOME": str(_spark_home()),
        "SPARK_LOCAL_IP": shost,
        "SPARK_LOG_DIR": str(base / "spark-logs"),
        "SPARK_DAEMON_MEMORY": "256m",
        "PYSPARK_PYTHON": sys.executable,
    }
    master_url = f"spark://{shost}:{sport}"
    return [
        Component(
            "object-store",
            s3_host,
            s3_port,
            object_store.command(s3_host, s3_port),
            Path(sys.executable).name,
            {},
            f"http://{s3_host}:{s3_port}",
        ),
        Component(
            object_store.MOUNT_COMPONENT,
            s3_host,
            s3_port,
            object_store.mount_command(settings),
            "s3fs",
            {},
            str(object_store.mount_point(settings)),
        ),
        Component(
            "flink-jobmanager",
            fhost,
            fport,
            [str(flink_bin / "jobmanager.sh"), "start-foreground"],
            "java",
            flink_env,
            f"http://{fhost}:{fport}",
        ),
        Component(
            "flink-taskmanager",
            fhost,
            fport,
            [str(flink_bin / "taskmanager.sh"), "start-foreground"],
            "java",
            flink_env,
            f"http://{fhost}:{fport}/#/task-manager",
        ),
        Component(
            "spark-master",
            shost,
            sport,
            [
                spark_class,
                "org.apache.spark.deploy.master.Master",
                "--host",
                shost,
                "--port",
                str(sport),
                "--webui-port",
                str(settings.cluster_spark_ui_port),
            ],
            "java",
            spark_env,
            f"http://{shost}:{settings.cluster_spark_ui_port}",
        ),
        Component(
            "spark-worker",
            shost,
            sport,
            [
                spark_class,
                "org.apache.spark.deploy.worker.Worker",
                master_url,
                "--host",
                shost,
                "--cores",
                str(settings.cluster_spark_worker_cores),
                "--memory",
                settings.cluster_spark_worker_memory,
                "--webui-port",
                str(settings.cluster_spark_worker_ui_port),
                "--work-dir",
                str(base / "spark-work"),
            ],
            "java",
            spark_env,
            f"http://{shost}:{settings.cluster_spark_worker_ui_port}",
        ),
    ]


def get_json(url: str, timeout_s: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


def probe(component: str, settings: Settings, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the component answers its protocol, else why not; with a detail on success
    available from ``detail``."""
    try:
        return _probe(component, settings, timeout_s)[0]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        return f"{type(exc).__name__}: {exc}"


def detail(component: str, settings: Settings) -> str:
    try:
        return _probe(component, settings, PROBE_TIMEOUT_S)[1]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return ""


def _probe(component: str, settings: Settings, timeout_s: float) -> tuple[str | None, str]:
    if component == "object-store":
        host, port = object_store.endpoint(settings)
        return object_store.probe(host, port, timeout_s), ""
    if component == object_store.MOUNT_COMPONENT:
        point = object_store.mount_point(settings)
        return object_store.probe_mount(settings), f"s3://{point.name} mounted (s3fs)"
    if component.startswith("flink"):
        host, port = flink_rest(settings)
        if not _port_answers(host, port, min(timeout_s, 1.0)):
            return f"nothing listens on {host}:{port}", ""
        overview = get_json(f"http://{host}:{port}/overview", timeout_s)
        if component == "flink-jobmanager":
            return None, f"{overview['jobs-running']} jobs running"
        if overview["taskmanagers"] < 1:
            return "no TaskManager registered", ""
        return None, f"{overview['slots-available']}/{overview['slots-total']} slots free"
    host, _ = spark_master(settings)
    ui = settings.cluster_spark_ui_port
    if not _port_answers(host, ui, min(timeout_s, 1.0)):
        return f"the master's web UI {host}:{ui} does not answer", ""
    master = get_json(f"http://{host}:{ui}/json/", timeout_s)
    if component == "spark-master":
        return (None if master["status"] == "ALIVE" else f"status {master['status']}"), (
            f"{master['url']}"
        )
    alive = [w for w in master["workers"] if w["state"] == "ALIVE"]
    if not alive:
        return "no ALIVE worker registered", ""
    return None, f"{sum(w['cores'] for w in alive)} cores, {sum(w['memory'] for w in alive)} MB"


def _status(c: Component, settings: Settings, record: ProcessRecord | None) -> ClusterStatus:
    managed = c.host in LOOPBACK_HOSTS
    ours = record is not None and _is_ours(record)
    ready = (ours or not managed) and probe(c.name, settings) is None
    component = ComponentStatus(
        c.name,
        managed,
        c.address,
        record.pid if ours and record else None,
        ours,
        ready,
        Path(record.log_path) if ours and record else None,
        time.time() - record.started_at if ours and record else None,
    )
    return ClusterStatus(component, c.web_ui, detail(c.name, settings) if ready else "")


def _start(c: Component, settings: Settings, records: dict[str, ProcessRecord]) -> None:
    log_path = _cluster_dir(settings) / f"{c.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **c.env}
    with open(log_path, "ab") as log_file:
        offset = log_file.tell()
        try:
            proc = subprocess.Popen(
                c.command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=_cluster_dir(settings),
            )
        except OSError as exc:
            raise StackError(f"cannot start {c.name} ({c.command[0]}): {exc}") from exc
    _CHILDREN[proc.pid] = proc
    records[c.name] = ProcessRecord(
        proc.pid, c.host, c.port, c.command, time.time(), str(log_path), c.binary
    )
    save_records(settings.state_dir, records, STATE_FILE)
    _event(logging.INFO, "starting", component=c.name, pid=proc.pid, address=c.address)
    began = time.monotonic()
    timeout = max(settings.startup_timeout_s, _JVM_STARTUP_S if c.binary == "java" else 0)
    why: str | None = "not checked"
    while proc.poll() is None and time.monotonic() - began < timeout:
        if (why := probe(c.name, settings)) is None:
            _event(
                logging.INFO,
                "ready",
                component=c.name,
                pid=proc.pid,
                elapsed_s=round(time.monotonic() - began, 2),
            )
            return
        time.sleep(0.25)
    problem = (
        f"did not answer within {timeout:g} s ({why})"
        if proc.poll() is None
        else f"exited with code {proc.returncode}"
    )
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _CHILDREN.pop(proc.pid, None)
    del records[c.name]
    save_records(settings.state_dir, records, STATE_FILE)
    raise StackError(
        f"{c.name} at {c.address} {problem}; last lines of {log_path}:\n"
        f"{_log_tail(log_path, offset)}"
    )


def cluster_up(settings: Settings) -> list[ClusterStatus]:
    """Start what of the cluster is not running (idempotent); wait until each answers."""
    with _locked(settings.state_dir):
        records = load_records(settings.state_dir, STATE_FILE)
        jm = records.get("flink-jobmanager")
        # A TaskManager must read the JobManager's RPC port from the same configuration.
        rpc_port = _recorded_rpc_port(settings) if jm is not None and _is_ours(jm) else None
        components = plan(settings, rpc_port)
        for c in components:  # all checked before anything starts
            if c.host not in LOOPBACK_HOSTS:
                raise StackError(
                    f"{c.name} is set to {c.address}, not loopback: `up --cluster` starts "
                    "processes on this machine only; unset the setting or run down"
                )
        for c in components:
            record = records.get(c.name)
            if record is not None and _is_ours(record):
                _event(logging.INFO, "already running", component=c.name, pid=record.pid)
                continue
            if c.name in ("object-store", "flink-jobmanager", "spark-master") and _port_answers(
                c.host, c.port
            ):
                raise StackError(f"something else already listens on {c.address} ({c.name})")
            if c.name == object_store.MOUNT_COMPONENT:
                object_store.prepare_mount(settings)
            _start(c, settings, records)
            if c.name == "object-store":
                object_store.create_bucket(settings)
        return _statuses(settings, records)


def _recorded_rpc_port(settings: Settings) -> int | None:
    path = _cluster_dir(settings) / "flink-conf" / "config.yaml"
    with suppress(OSError, ValueError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(": ")
            if key == "jobmanager.rpc.port":
                return int(value)
    return None


def _statuses(settings: Settings, records: dict[str, ProcessRecord]) -> list[ClusterStatus]:
    components = plan(settings, _recorded_rpc_port(settings))
    return [_status(c, settings, records.get(c.name)) for c in components]


def cluster_records(settings: Settings) -> dict[str, ProcessRecord]:
    """What cluster.json records (empty: `up --cluster` was not run)."""
    return load_records(settings.state_dir, STATE_FILE)


def cluster_status(settings: Settings) -> list[ClusterStatus]:
    return _statuses(settings, load_records(settings.state_dir, STATE_FILE))


def cluster_down(settings: Settings) -> list[str]:
    """Stop the recorded cluster processes, workers before masters; their names."""
    stopped: list[str] = []
    with _locked(settings.state_dir):
        records = load_records(settings.state_dir, STATE_FILE)
        for name in reversed(COMPONENTS):
            record = records.get(name)
            if record is None:
                continue
            ours = _is_ours(record)
            if name == object_store.MOUNT_COMPONENT:
                # Only the mount this stack made, also when its s3fs died and left it stale;
                # unmounted, s3fs exits by itself.
                object_store.unmount(object_store.mount_point(settings))
            if ours:
                _stop_tree(name, record)
                stopped.append(name)
            del records[name]
            save_records(settings.state_dir, records, STATE_FILE)
    return stopped


def _stop_tree(name: str, record: ProcessRecord) -> None:
    """Stop the process; then whatever it left in its session (a TaskManager's Python workers)."""
    if name in ("flink-taskmanager", "spark-worker", object_store.MOUNT_COMPONENT):
        # Each shares a port with its master or store: only wait for the pid, not the port.
        _stop_pid(name, record)
    else:
        _stop(name, record)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(record.pid, signal.SIGKILL)


def _stop_pid(name: str, record: ProcessRecord) -> None:
    for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        with suppress(ProcessLookupError):
            os.kill(record.pid, sig)
        if _wait_until(lambda: _gone(record.pid), wait_s):
            _event(logging.INFO, "stopped", component=name, pid=record.pid)
            return
    raise StackError(f"{name} pid {record.pid} survived SIGKILL")


def kill_taskmanager(settings: Settings) -> int:
    """SIGKILL the TaskManager (a crash, for failover tests); its pid."""
    records = load_records(settings.state_dir, STATE_FILE)
    record = records.get("flink-taskmanager")
    if record is None or not _is_ours(record):
        raise StackError("no TaskManager of ours runs: run `sluice up --cluster`")
    os.killpg(record.pid, signal.SIGKILL)
    _wait_until(lambda: _gone(record.pid), 10.0)
    return record.pid


def wait_until(check: Callable[[], bool], timeout_s: float) -> bool:
    return _wait_until(check, timeout_s)
