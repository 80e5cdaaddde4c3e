"""Open-loop HTTP load for fault tests: requests start on a fixed schedule (rate per second),
whatever the server does, each with its own deadline; every outcome is kept."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Outcome:
    started: float  # time.monotonic() when the request was sent
    latency_s: float
    status: int | None  # None: no answer (timeout, refused, reset)
    prediction_id: str | None = None
    error: str | None = None


@dataclass
class Load:
    """A load running in a thread of its own; ``join`` returns the outcomes."""

    outcomes: list[Outcome] = field(default_factory=list)
    thread: threading.Thread | None = None

    def join(self, timeout_s: float) -> list[Outcome]:
        assert self.thread is not None
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the load did not finish"
        return self.outcomes


def start_load(
    url: str,
    body: Callable[[int], dict[str, Any]],
    *,
    rate: float,
    duration_s: float,
    deadline_s: float,
    max_outstanding: int = 500,
) -> Load:
    """POST body(i) to url ``rate`` times a second for ``duration_s``, in a background thread.

    A request still outstanding after ``deadline_s`` counts as unanswered (status None)."""
    load = Load()

    async def one(client: httpx.AsyncClient, i: int, slots: asyncio.Semaphore) -> None:
        started = time.monotonic()  # open loop: waiting for a slot counts as latency too
        async with slots:
            try:
                answer = await client.post(url, json=body(i), timeout=deadline_s)
                latency = time.monotonic() - started
                pid = None
                if answer.status_code == 200:
                    pid = answer.json()["predictions"][0]["prediction_id"]
                load.outcomes.append(Outcome(started, latency, answer.status_code, pid))
            except httpx.HTTPError as exc:
                latency = time.monotonic() - started
                load.outcomes.append(Outcome(started, latency, None, None, type(exc).__name__))

    async def run() -> None:
        slots = asyncio.Semaphore(max_outstanding)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(limits=limits) as client:
            tasks = []
            began = time.monotonic()
            for i in range(int(rate * duration_s)):
                delay = began + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(client, i, slots)))
            await asyncio.gather(*tasks)

    load.thread = threading.Thread(target=lambda: asyncio.run(run()), name="load", daemon=True)
    load.thread.start()
    return load


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
