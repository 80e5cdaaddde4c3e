"""Fault-injection helpers: a Redis of the test's own (to SIGSTOP) and the predictor as a
subprocess (`sluice serve` on loopback). The load is tests/helpers/load.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx

from infra.stack import free_port

REPO = Path(__file__).resolve().parents[2]
SLUICE = str(Path(sys.executable).parent / "sluice")


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGCONT (it may be stopped), SIGTERM, then SIGKILL: by its pid only."""
    if proc.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@contextmanager
def own_redis(state_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A redis-server on a free loopback port, no persistence; yields it and its URL."""
    import redis

    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not on PATH"
    port = free_port()
    log = open(state_dir / "redis.log", "wb")  # noqa: SIM115  # closed in finally
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [*args, "--dir", str(state_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis.from_url(url, socket_timeout=0.5) as client:
                    client.ping()
                break
            except redis.RedisError:
                assert proc.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis did not answer within 10 s"
                time.sleep(0.05)
        yield proc, url
    finally:
        stop_process(proc)
        log.close()


@contextmanager
def predictor(env: Mapping[str, str], log_path: Path) -> Iterator[str]:
    """`sluice serve` with these SLUICE_* settings on a free loopback port; yields its URL once
    /health answers."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SLUICE_")}
    full_env |= dict(env) | {
        "SLUICE_SERVE_HOST": "127.0.0.1",
        "SLUICE_SERVE_PORT": str(port),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    log = open(log_path, "wb")  # noqa: SIM115  # closed in finally
    proc = subprocess.Popen(
        [SLUICE, "serve"], cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"sluice serve exited: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no /health: {log_path.read_text()[-3000:]}"
            with suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        yield url
    finally:
        stop_process(proc)
        log.close()
