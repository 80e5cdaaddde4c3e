"""Fault-injection helpers: a Redis of the test's own (to SIGSTOP), the predictor as a
subprocess (`sluice serve` on loopback), and an open-loop load generator that records every
request it sent and what came back.

Open loop: request i is sent at start + i / rate whether or not earlier ones were answered, so
a stalled server shows up as slow answers instead of as fewer requests.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass
class Shot:
    """One request of the load: when it was sent (seconds from the start) and what came back."""

    index: int
    sent_s: float
    latency_s: float | None = None  # None: no answer (client timeout or connection error)
    status: int | None = None
    body: dict[str, Any] | None = None
    error: str | None = None


def open_loop(
    url: str,
    rate: float,
    duration_s: float,
    request: Callable[[int], dict[str, Any]],
    *,
    headers: Mapping[str, str] | None = None,
    events: Mapping[float, Callable[[], None]] | None = None,
    workers: int = 48,
    client_timeout_s: float = 10.0,
) -> tuple[list[Shot], dict[float, float]]:
    """POST request(i) to url at start + i / rate for duration_s; ``events`` run at their
    offsets (seconds) from the start, on the caller's thread. Returns every request sent, and
    per event offset the time (from the start) its action had completed."""
    count = int(rate * duration_s)
    shots = [Shot(i, i / rate) for i in range(count)]
    # One client for all threads (its pool is thread-safe): building one per thread loads the
    # CA bundle 48 times, seconds of CPU that would starve the server at the start.
    client = httpx.Client(
        timeout=client_timeout_s,
        headers=dict(headers or {}),
        limits=httpx.Limits(max_connections=workers, max_keepalive_connections=workers),
    )
    ready = threading.Barrier(workers + 1)
    start = 0.0

    def work(k: int) -> None:
        ready.wait()
        for shot in shots[k::workers]:
            delay = start + shot.sent_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            began = time.perf_counter()
            shot.sent_s = began - start
            try:
                answer = client.post(url, json=request(shot.index))
            except httpx.HTTPError as exc:
                shot.error = f"{type(exc).__name__}: {exc}"
                continue
            shot.latency_s = time.perf_counter() - began
            shot.status = answer.status_code
            shot.body = answer.json()

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(workers)]
    for thread in threads:
        thread.start()
    start = time.perf_counter() + 0.2
    ready.wait()
    fired: dict[float, float] = {}
    for offset, action in sorted((events or {}).items()):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        action()
        fired[offset] = time.perf_counter() - start
    for thread in threads:
        thread.join(duration_s + client_timeout_s + 30)
    client.close()
    return shots, fired


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]
