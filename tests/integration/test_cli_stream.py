"""`sluice produce` at a steady rate + `sluice ingest` + `sluice stream`, in subprocesses, on a
stack of their own, with tests/helpers/stream_definitions.py (5 s slides): Redis keeps up with the
events, Feast reads the values the reference (and so Spark, see test_flink_parity.py) computes
from the same events, and Ctrl-C stops the job with a savepoint and balanced counts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.records import DeadLetter, is_heartbeat
from core.settings import load_settings
from features.reference import compute_view, with_closing_rows
from infra.stack import free_port
from tests.helpers.stream import patient_store, read_all, row_differences
from tests.helpers.stream_definitions import live_restaurant_orders, live_zone_couriers

pytestmark = [pytest.mark.integration, pytest.mark.flink, pytest.mark.slow]
SLUICE = str(Path(sys.executable).parent / "sluice")
RATE, EVENTS = 400, 8000  # 20 s of live traffic


def sluice(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [SLUICE, *args], env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, f"sluice {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def background(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([SLUICE, *args], env=env, stdout=out, stderr=subprocess.STDOUT)


def test_live_stream_keeps_redis_current_and_feast_agrees(tmp_path: Path) -> None:
    # An in-process Flink job earlier in the session (PyFlink's loopback mode) leaves
    # PYFLINK_GATEWAY_DISABLED set in this process, which would stop the child's job.
    inherited = {k: v for k, v in os.environ.items() if k != "PYFLINK_GATEWAY_DISABLED"}
    env = inherited | {
        "SLUICE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "SLUICE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "SLUICE_STATE_DIR": str(tmp_path / "state"),
        "SLUICE_FEAST_REGISTRY": str(tmp_path / "registry.db"),
        "SLUICE_OFFLINE_STORE_DIR": str(tmp_path / "offline"),
        "SLUICE_FEAST_PROJECT": "cli_stream",
        "COLUMNS": "200",
        # Views with 5 s slides and 2 s lateness, so that 20 s of traffic closes windows.
        "SLUICE_DEFINITIONS_MODULE": "tests.helpers.stream_definitions",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    settings = load_settings(
        kafka_bootstrap=env["SLUICE_KAFKA_BOOTSTRAP"],
        redis_url=env["SLUICE_REDIS_URL"],
        state_dir=tmp_path / "state",
        feast_registry=tmp_path / "registry.db",
        offline_store_dir=tmp_path / "offline",
        feast_project="cli_stream",
        definitions_module="tests.helpers.stream_definitions",
    )
    stream_log = tmp_path / "stream.log"
    stream: subprocess.Popen[bytes] | None = None
    sluice(env, "up")
    try:
        sluice(env, "features", "apply")
        stream = background(env, stream_log, "stream", "--report-every", "2")
        ingest = background(env, tmp_path / "ingest.log", "ingest", "--idle-timeout", "15")
        produced = sluice(env, "produce", "--rate", str(RATE), "--events", str(EVENTS))
        assert f"produced {EVENTS} events" in produced
        assert ingest.wait(timeout=120) == 0, (tmp_path / "ingest.log").read_text()

        views = (live_restaurant_orders, live_zone_couriers)
        # Ingest's heartbeats (it idles 15 s at the end) are not events.
        records = {v.source.name: list(read_all(settings, v.source.topic)) for v in views}
        raw = {
            name: [m.value() or b"" for m in msgs if not is_heartbeat(m.headers())]
            for name, msgs in records.items()
        }
        assert any(is_heartbeat(m.headers()) for m in records["orders"]), "no heartbeats"
        late: dict[str, set[bytes]] = defaultdict(set)
        for msg in read_all(settings, settings.dead_letter_topic):
            view_name = DeadLetter.from_headers(msg.headers()).view
            if view_name:
                late[view_name].add(msg.value() or b"")
        assert raw["orders"], "ingest forwarded no orders"

        # Redis keeps up: within a minute of the last event, every stream view holds the rows
        # of windows closed by the watermark (newest event time - allowed lateness).
        deadline = time.monotonic() + 90
        with patient_store(settings) as store:
            while True:
                caught_up, online = _online_state(store, views, raw, late)
                if caught_up or time.monotonic() > deadline:
                    break
                assert stream.poll() is None, stream_log.read_text()
                time.sleep(1)
        assert caught_up, f"Redis fell behind: {caught_up=}\n{stream_log.read_text()[-3000:]}"

        # Feast reads exactly the reference values at the window end each entity holds.
        from feature_repo.config import feature_store

        fs = feature_store(settings)
        for view in views:
            want_rows, stored = online[view.name]
            keys = sorted(stored)
            assert len(keys) > 3, f"{view.name}: too few entities online to compare"
            served = fs.get_online_features(
                features=[f"{view.name}:{spec.name}" for spec in view.features()],
                entity_rows=[{view.entity.join_key: key} for key in keys],
            ).to_dict()
            got = {
                (key, stored[key]): {s.name: served[s.name][i] for s in view.features()}
                for i, key in enumerate(keys)
            }
            want = {k: want_rows[k] for k in got}
            assert row_differences(got, want) == [], view.name

        stream.send_signal(signal.SIGINT)
        assert stream.wait(timeout=180) == 0, stream_log.read_text()
        out = stream_log.read_text()
        assert "stopped after" in out, out
        assert "savepoint:" in out, out
        assert re.search(r"live_restaurant_orders: [\d,]+ events, [\d,]+/s", out), out
        assert "do not balance" not in out
    finally:
        if stream is not None and stream.poll() is None:
            stream.kill()
            stream.wait(timeout=30)
        sluice(env, "down")


def _online_state(
    store: Any, views: tuple[Any, ...], raw: dict[str, list[bytes]], late: dict[str, set[bytes]]
) -> tuple[bool, dict[str, tuple[dict[Any, Any], dict[str, int]]]]:
    """Whether every view's newest online end is within 2 slides of its watermark, and per
    view the reference rows and each stored entity's window end."""
    caught_up = True
    out = {}
    for view in views:
        counted = [orjson.loads(b) for b in raw[view.source.name] if b not in late[view.name]]
        want = with_closing_rows(view, compute_view(view, counted))
        keys = sorted({k for k, _ in want})
        rows = store.read(view, keys)
        stored = {k: r.window_end_ms for k, r in zip(keys, rows, strict=True) if r is not None}
        lateness = int(view.source.allowed_lateness.total_seconds() * 1000)
        watermark = max(e[view.source.event_time_field] for e in counted) - lateness
        newest = max(stored.values(), default=0)
        caught_up &= newest >= watermark - 2 * view.slide_ms
        out[view.name] = (want, stored)
    return caught_up, out
