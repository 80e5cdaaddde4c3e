"""Open-loop HTTP load for the fault tests, in a process of its own.

Request i is due at ``start + i / rate`` whatever the server does (open loop), so a stalled
server shows up as late answers, not as fewer requests; a request's latency counts from when
it was due, so time spent waiting for a free connection is counted too (no coordinated
omission). Every outcome is kept: status, latency, the prediction id and degraded flags of
the answer, or why there was none.

The generator is a separate process (``python -m tests.helpers.load``) speaking HTTP/1.1 over
raw asyncio streams with keep-alive connections: it costs the machine little CPU and none of
the test's own interpreter, and the test process stays free to inject faults on time. Both
processes use CLOCK_MONOTONIC, which Linux shares between processes, so the test fires its
faults at offsets from the generator's start and classifies outcomes by the same clock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Outcome:
    index: int
    started: float  # time.monotonic() when the request was due
    latency_s: float | None  # None: no answer within the client's timeout or an I/O error
    status: int | None = None
    lag_s: float = 0.0  # how late the generator itself sent it (a starved machine)
    prediction_id: str | None = None
    degraded: list[str] | None = None
    error: str | None = None


def delivery_request(i: int) -> dict[str, Any]:
    """Request i: one row of the delivery example, cycling through 20 restaurants, 5 zones."""
    return {
        "rows": [
            {
                "restaurant_id": f"r{i % 20:03d}",
                "zone_id": f"z{i % 5}",
                "distance_km": 0.5 + i % 9,
                "hour_of_day": i % 24,
                "items": 1 + i % 5,
            }
        ]
    }


# uvicorn closes a keep-alive connection idle for 5 s (timeout_keep_alive); one idle longer
# than this is closed here instead of being reused while the server closes it.
IDLE_S = 3.0


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.used = time.monotonic()

    def usable(self) -> bool:
        fresh = time.monotonic() - self.used < IDLE_S
        return fresh and not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class _Pool:
    """Keep-alive connections to one host, at most ``size`` open at once."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_Connection] = []
        self.slots = asyncio.Semaphore(size)

    async def open(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return _Connection(reader, writer)

    async def take(self) -> tuple[_Connection, bool]:
        """An idle connection that is still open (reused: True), else a new one."""
        while self.idle:
            conn = self.idle.pop()
            if conn.usable():
                return conn, True
            conn.close()
        return await self.open(), False

    async def post(self, path: str, head: bytes, payload: bytes) -> tuple[int, bytes]:
        async with self.slots:
            conn, reused = await self.take()
            try:
                conn.writer.write(head + payload)
                status_line = await conn.reader.readline()
                if not status_line and reused:
                    # The server closed an idle connection as the request went out (it read
                    # none of it): send it once more on a new one, as HTTP clients do.
                    conn.close()
                    conn = await self.open()
                    conn.writer.write(head + payload)
                    status_line = await conn.reader.readline()
                if not status_line:
                    raise ConnectionError("connection closed before the answer")
                status = int(status_line.split()[1])
                length, keep = 0, True
                while (line := await conn.reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value)
                    elif name == "connection" and value.strip().lower() == "close":
                        keep = False
                    elif name == "transfer-encoding":
                        raise ConnectionError("chunked answers are not supported")
                body = await conn.reader.readexactly(length)
            except BaseException:
                conn.close()  # cancelled (timeout) or broken: never reused mid-answer
                raise
            if keep:
                conn.used = time.monotonic()
                self.idle.append(conn)
            else:
                conn.close()
            return status, body


async def _run(args: argparse.Namespace) -> list[Outcome]:
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    path = url.path or "/"
    headers = dict(h.split(":", 1) for h in args.header)
    pool = _Pool(host, port, args.connections)
    count = int(args.rate * args.duration)
    payloads = [json.dumps(delivery_request(i)).encode() for i in range(count)]
    extra = "".join(f"{k.strip()}: {v.strip()}\r\n" for k, v in headers.items())
    outcomes: list[Outcome] = []

    async def one(i: int, due: float) -> None:
        payload = payloads[i]
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n{extra}\r\n"
        ).encode()
        outcome = Outcome(i, due, None, lag_s=time.monotonic() - due)
        try:
            status, body = await asyncio.wait_for(pool.post(path, head, payload), args.timeout)
            outcome.latency_s = time.monotonic() - due
            outcome.status = status
            if status == 200:
                prediction = json.loads(body)["predictions"][0]
                outcome.prediction_id = prediction.get("prediction_id")
                outcome.degraded = prediction.get("degraded")
            else:
                outcome.error = body[:300].decode(errors="replace")
        except (TimeoutError, OSError, ValueError, KeyError, asyncio.IncompleteReadError) as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcomes.append(outcome)

    # Warm connections before the clock starts: opening them is not the server's latency.
    warm = await asyncio.gather(
        *(pool.open() for _ in range(min(args.warm, args.connections))), return_exceptions=True
    )
    pool.idle.extend(c for c in warm if isinstance(c, _Connection))
    start = time.monotonic() + 0.2
    print(f"start {start!r}", flush=True)
    tasks = []
    for i in range(count):
        due = start + i / args.rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    for conn in pool.idle:
        conn.close()
    return sorted(outcomes, key=lambda o: o.index)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--timeout", type=float, required=True, help="client timeout, s")
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--warm", type=int, default=32)
    parser.add_argument("--header", action="append", default=[], help="Name: value")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    outcomes = asyncio.run(_run(args))
    Path(args.out).write_text(json.dumps([asdict(o) for o in outcomes]))


class LoadProcess:
    """A running generator: ``start`` is its clock's zero (time.monotonic() of request 0)."""

    def __init__(self, proc: subprocess.Popen[str], out: Path, start: float, bound_s: float):
        self.proc, self.out, self.start, self.bound_s = proc, out, start, bound_s

    def at(self, offset_s: float) -> None:
        """Sleep until ``offset_s`` seconds after the load's start."""
        delay = self.start + offset_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def join(self) -> list[Outcome]:
        """Wait for the generator (bounded: the schedule plus its client timeout) and return
        every outcome."""
        try:
            self.proc.wait(max(1.0, self.start + self.bound_s + 15 - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError("the load generator did not finish in time") from None
        self._close_pipe()
        assert self.proc.returncode == 0, f"the load generator exited with {self.proc.returncode}"
        return [Outcome(**o) for o in json.loads(self.out.read_text())]

    def stop(self) -> None:
        """Stop the generator by its pid (a test that failed half way)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_load(
    url: str,
    *,
    rate: float,
    duration_s: float,
    timeout_s: float,
    out: Path,
    headers: Mapping[str, str] | None = None,
    connections: int = 256,
) -> LoadProcess:
    """Start ``python -m tests.helpers.load`` against url; returns once its clock is set."""
    command = [
        sys.executable,
        "-m",
        "tests.helpers.load",
        f"--url={url}",
        f"--rate={rate}",
        f"--duration={duration_s}",
        f"--timeout={timeout_s}",
        f"--connections={connections}",
        f"--out={out}",
        *(f"--header={k}: {v}" for k, v in (headers or {}).items()),
    ]
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    }
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: the generator prints it before any request
    if not line.startswith("start "):
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()
        raise AssertionError(f"the load generator did not start: {line!r}")
    return LoadProcess(proc, out, float(line.split()[1]), duration_s + timeout_s)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def latency_figures(outcomes: Sequence[Outcome]) -> str:
    """n, p50, p99 and max latency (ms) of the answered outcomes, and the generator's own
    worst lag in sending them (when it is large, the machine starved the client too)."""
    ms = [o.latency_s * 1000 for o in outcomes if o.latency_s is not None]
    lag = max((o.lag_s * 1000 for o in outcomes), default=float("nan"))
    return (
        f"n={len(ms)} p50={percentile(ms, 50):.1f}ms p99={percentile(ms, 99):.1f}ms "
        f"max={max(ms, default=float('nan')):.1f}ms (client send lag max {lag:.0f}ms)"
    )


def ms_figures(ms: Sequence[float]) -> str:
    """p50, p99 and max of some milliseconds."""
    return (
        f"p50={percentile(ms, 50):.1f}ms p99={percentile(ms, 99):.1f}ms "
        f"max={max(ms, default=float('nan')):.1f}ms"
    )


if __name__ == "__main__":
    main()
