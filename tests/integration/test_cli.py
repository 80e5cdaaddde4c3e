"""The acceptance path through the real CLI, in subprocesses, on a stack of its own:
`sluice up && sluice produce --events 10000 && sluice status && sluice down`, then ingest."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from infra.stack import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SLUICE = str(Path(sys.executable).parent / "sluice")


def running_pids(table: str) -> list[str]:
    """The pid cell of each "running" row of the stack table."""
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in table.splitlines()]
    return [row[3] for row in rows if len(row) == 6 and row[1] == "running"]


def exited(pid: int) -> bool:
    """Gone, or a zombie: `up` ran in a process that has exited, so init reaps its children
    when it gets to it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in "ZX"


def sluice(env: dict[str, str], *args: str, expect: int = 0) -> str:
    proc = subprocess.run(
        [SLUICE, *args], env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == expect, f"sluice {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_up_produce_status_ingest_down(tmp_path: Path):
    env = os.environ | {
        "SLUICE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "SLUICE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "SLUICE_STATE_DIR": str(tmp_path / "state"),
        "COLUMNS": "200",
    }
    try:
        first = sluice(env, "up")
        second = sluice(env, "up")  # idempotent
        pids = running_pids(first)
        assert len(pids) == 2, first
        assert all(pid.isdigit() for pid in pids), first
        assert running_pids(second) == pids

        out = sluice(
            env,
            "produce",
            "--events",
            "10000",
            "--corrupt-fraction",
            "0.05",
            "--history",
            str(tmp_path / "history"),
        )
        assert "produced 10000 events" in out
        malformed = re.search(r"\((\d+) malformed on purpose\)", out)
        assert malformed, out
        produced_bad = int(malformed.group(1))
        assert 300 < produced_bad < 700

        status = sluice(env, "status")
        assert "raw.orders" in status
        assert status.count("running") == 2

        out = sluice(env, "ingest", "--idle-timeout", "3")
        match = re.search(r"(\d+) in = (\d+) valid \+ (\d+) dead-lettered \(balanced\)", out)
        assert match, out
        received, valid, dead = map(int, match.groups())
        assert (received, dead) == (10000, produced_bad)
        assert valid == 10000 - produced_bad
        assert len(list((tmp_path / "history").rglob("*.parquet"))) >= 3
    finally:
        out = sluice(env, "down")
    assert "broker" in out
    assert "redis" in out
    for pid in pids:
        assert exited(int(pid)), pid
    assert "nothing was running" in sluice(env, "down")


def test_bad_setting_is_a_clear_error(tmp_path: Path):
    env = os.environ | {"SLUICE_TOPIC_PARTITIONS": "0", "SLUICE_STATE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [SLUICE, "status"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: invalid setting SLUICE_TOPIC_PARTITIONS: expected an integer from 1 to 1024, "
        "got '0'"
    )
