"""Helpers of the pipeline fault tests (tests/integration/test_fault_pipeline.py): a definitions
module of the test's own (its topics and view named by a tag, so that `sluice` subprocesses see
only the test's records), the environment those subprocesses run with, and SIGKILL of a process
with every process it started (the Flink JVM and its Python workers), by pid."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from types import ModuleType
from typing import Any

from core.records import FeatureRow, is_heartbeat
from core.settings import Settings
from features.definitions import FeatureView
from streaming.compile import features_topic
from tests.helpers.stream import read_all

REPO = Path(__file__).resolve().parents[2]
SLUICE = str(Path(sys.executable).parent / "sluice")

DEFINITIONS = '''"""Written by tests/helpers/pipeline.py: courier pings on topics of one test."""
from examples.delivery import features as delivery
from examples.delivery import sources as examples
from features.definitions import Aggregation, AggregationFunction, FeatureView, Window

# Module attributes are definitions: the originals stay behind their modules.
pings = examples.COURIER_PINGS.model_copy(
    update={{"topic": "{tag}.events.courier_pings", "raw_topic": "{tag}.raw.courier_pings"}}
)
# A count: an event counted twice shows in it at once (a mean may hide a repeat).
pipe_view = FeatureView(
    name="pipe_{tag}",
    entity=delivery.zone,
    source=pings,
    aggregations=(
        Aggregation(
            function=AggregationFunction.COUNT, windows=(Window.sliding("5m", every="1m"),)
        ),
        Aggregation(
            function=AggregationFunction.MEAN,
            column="speed_kmh",
            windows=(Window.sliding("5m", every="1m"),),
        ),
        Aggregation(
            function=AggregationFunction.COUNT_DISTINCT,
            column="courier_id",
            windows=(Window.sliding("10m", every="1m"),),
        ),
    ),
)
'''


def definitions_module(directory: Path, tag: str) -> ModuleType:
    """Write and import the module ``pipe_defs_<tag>`` (its directory joins sys.path)."""
    name = f"pipe_defs_{tag}"
    (directory / f"{name}.py").write_text(DEFINITIONS.format(tag=tag))
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    return importlib.import_module(name)


def sluice_env(settings: Settings, module: ModuleType, **extra: str) -> dict[str, str]:
    """The environment of a `sluice` subprocess on the test's stack and definitions."""
    directory = str(Path(module.__file__ or "").parent)
    env = {k: v for k, v in os.environ.items() if k != "PYFLINK_GATEWAY_DISABLED"}
    return env | {
        "SLUICE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "SLUICE_REDIS_URL": settings.redis_url,
        "SLUICE_STATE_DIR": str(settings.state_dir),
        "SLUICE_FEAST_PROJECT": settings.feast_project,
        "SLUICE_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
        "SLUICE_DEFINITIONS_MODULE": module.__name__,
        "PYTHONPATH": os.pathsep.join([str(REPO), directory]),
        "COLUMNS": "200",
        **extra,
    }


def descendants(pid: int) -> list[int]:
    """Every process below pid (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_tree(pid: int, timeout_s: float = 30.0) -> int:
    """SIGKILL pid and every process it started, all at once (a crash, not a shutdown); wait
    until they are gone. Returns how many processes were killed."""
    tree = [pid, *descendants(pid)]
    for member in tree:
        with suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    # The direct child is reaped by its Popen; the others by init once their parent is gone.
    while any(alive(m) for m in tree[1:]):
        assert time.monotonic() < deadline, f"processes {tree} outlived SIGKILL"
        time.sleep(0.1)
    return len(tree)


def events_in_topic(settings: Settings, topic: str) -> list[Any]:
    """Every record of an events topic but heartbeats."""
    return [m for m in read_all(settings, topic, idle_s=1.0) if not is_heartbeat(m.headers())]


def feature_rows(settings: Settings, view: FeatureView) -> tuple[dict[tuple[str, int], Any], int]:
    """The rows of features.<view> by (entity, window end), and how many records repeated a
    row; a repeat must carry the same values (a restarted job re-emits what it emitted after
    its checkpoint)."""
    got: dict[tuple[str, int], Any] = {}
    repeats = 0
    for msg in read_all(settings, features_topic(view.name)):
        row = FeatureRow.decode(msg.value())
        key = (row.entity_key, row.window_end_ms)
        if key in got:
            repeats += 1
            assert got[key] == row.values, f"row {key} repeated with other values"
        got[key] = row.values
    return got, repeats


def background(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`sluice <args>` as a child process, its output appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen([SLUICE, *args], env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> int:
    """Send ``sig`` (if it still runs) and wait; killed after ``timeout``. Its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=30)
