"""bench.serve's load generator and what it measures of a server process (no sluice code).

The clients are bare keep-alive HTTP/1.1 connections on uvloop: on two cores the load
generator shares the machine with the servers it measures, so it must stay cheap.
"""

from __future__ import annotations

import asyncio
import os
import time


class _Connection(asyncio.Protocol):
    """A bare keep-alive HTTP/1.1 client, one request at a time: httpx costs more CPU per
    request than the servers measured here, and on two cores the load generator must stay
    cheap. For the same reason it is an asyncio Protocol (a StreamReader's line-by-line reads
    cost more) on uvloop, as both servers are."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.answer: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's: not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0 or self.answer is None:
            return
        head = self.buffer[: head_end + 2].lower()  # each header line ends with CRLF
        at = head.find(b"\r\ncontent-length:")
        length = int(head[at + 17 : head.find(b"\r\n", at + 2)]) if at >= 0 else 0
        if len(self.buffer) >= head_end + 4 + length:
            body = self.buffer[head_end + 4 : head_end + 4 + length]
            self.buffer = self.buffer[head_end + 4 + length :]
            self.answer.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(exc or ConnectionError("connection closed"))

    async def post(self, host: str, path: str, body: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(head.encode() + body)
        return await self.answer


async def run_load(
    port: int, seconds: float, concurrency: int, bodies: list[bytes]
) -> tuple[int, list[float], int]:
    """Each client posts the next body of ``bodies`` (cycled) as soon as its last answer came.
    Returns the failed requests, the latencies of the answered ones, and how many answers
    sluice served degraded (from the views' empty values: the store's read timed out, its
    breaker was open, or the request's deadline came first; serving/deadlines.py)."""
    latencies: list[float] = []
    errors = degraded = 0
    deadline = time.perf_counter() + seconds
    cursor = 0

    async def worker() -> None:
        nonlocal errors, degraded, cursor
        _, connection = await asyncio.get_running_loop().create_connection(
            _Connection, "127.0.0.1", port
        )
        while time.perf_counter() < deadline:
            body = bodies[cursor % len(bodies)]
            cursor += 1
            started = time.perf_counter()
            status, answer = await connection.post(f"127.0.0.1:{port}", "/predict", body)
            if status != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)
            if b'"degraded":[' in answer and b'"degraded":[]' not in answer:
                degraded += 1
        assert connection.transport is not None
        connection.transport.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors, latencies, degraded


def summary(latencies: list[float], seconds: float) -> dict[str, float]:
    ms = sorted(x * 1000 for x in latencies)
    return {
        "throughput": len(ms) / seconds,
        "p50": ms[len(ms) // 2],
        "p99": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
    }


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants, from /proc (Linux; NaN
    elsewhere). CPU per request is what a shared machine's load changes least: the servers'
    cost, beside the throughput the load decides."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return float("nan")
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, p in parents.items() if p == parent and child not in tree]
        tree.update(children)
        frontier += children
    return sum(times.get(p, 0.0) for p in tree)
