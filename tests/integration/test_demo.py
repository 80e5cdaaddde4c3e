"""`sluice demo` (the README's main command) end to end, on a stack of its own.

The demo starts its own broker and Redis (free ports here), produces, ingests, archives,
streams, backfills, compares Flink with Spark, trains, serves and monitors, and exits non-zero
when any of its checks fails. The history and offline store hold a file of an "earlier run":
the broker is new, so the demo must drop them (the archive would otherwise resume at the old
topics' offsets and archive nothing).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.stack import free_port

pytestmark = [pytest.mark.integration, pytest.mark.flink, pytest.mark.spark, pytest.mark.slow]
SLUICE = str(Path(sys.executable).parent / "sluice")
REPO = Path(__file__).resolve().parents[2]


def test_the_demo_runs_end_to_end_and_forgets_an_earlier_runs_history(tmp_path: Path):
    history, offline = tmp_path / "history", tmp_path / "offline"
    stale = [history / "orders" / "part-earlier.parquet", offline / "restaurant_orders" / "x"]
    for path in stale:
        path.parent.mkdir(parents=True)
        path.write_bytes(b"from a run on another broker")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")} | {
        "SLUICE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "SLUICE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "SLUICE_STATE_DIR": str(tmp_path / "state"),
        "SLUICE_HISTORY_DIR": str(history),
        "SLUICE_OFFLINE_STORE_DIR": str(offline),
        "SLUICE_FEAST_REGISTRY": str(tmp_path / "registry.db"),
        "SLUICE_MODELS_DIR": str(tmp_path / "models"),
        "SLUICE_SERVE_PORT": str(free_port()),
        "SLUICE_MONITOR_PORT": str(free_port()),
        "PYTHONPATH": str(REPO),
        "COLUMNS": "200",
    }
    proc = subprocess.run(
        [SLUICE, "demo", "--events", "6000"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "from an earlier run on another broker, removed" in out, out[:3000]
    assert not any(path.exists() for path in stale)
    assert "rejections by reason match the injected ones" in out, out[-6000:]
    assert "broker and Redis stopped" in out, out[-3000:]  # it stops what it started
