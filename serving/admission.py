"""Admission control: answer 503 at once when a request would miss the latency objective.

With more concurrent clients than a replica can answer within ``latency_objective_ms``,
requests queue (in the kernel, in the event loop, in the batcher) and every one of them is
late; AIMD only picks the batch size that drains the queue fastest. With ``serve_admission =
"objective"`` a request is refused before it is queued when the replica predicts that it would
be answered after the objective, so that the ones it accepts are answered in time and the
others learn at once (503 ``overloaded``, header ``Retry-After``) that they should go
elsewhere or back off, instead of waiting to be late. Refusals are counted in
``sluice_shed_requests_total{model}`` (and as 503s in ``sluice_requests_total``).

The prediction, per model (all its versions' batchers):

    lag + ceil((queued + rows) / size) * batch_ms

- ``lag``: how late the event loop runs its callbacks (a monitor task sleeps LAG_TICK_S and
  measures the overshoot): the time a request that has arrived waits before the route sees it,
  which the server's own clocks miss;
- ``queued``: rows waiting in the model's batchers, ``rows`` the request's own;
- ``size``: the AIMD batch size of the production version; ``batch_ms``: the recent time one
  batch takes (feature read + predict), an exponentially weighted mean over batches.

Until a first batch has run, and whenever nothing is queued, a request is admitted: first in
line, it waits for no other request, and the batches it makes keep the estimate current (a
replica that refused everything would never learn that it got faster). The estimate is cheap (a few
arithmetic operations per request) and errs towards admitting: the wait behind the batch that
is running is not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable

LAG_TICK_S = 0.005
_WEIGHT = 0.2  # of the newest observation in the weighted means


class LoopLag:
    """The event loop's lag (seconds), an exponentially weighted mean of a monitor's overshoot."""

    def __init__(
        self, tick_s: float = LAG_TICK_S, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.tick_s = tick_s
        self.lag_s = 0.0
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    def observe(self, overshoot_s: float) -> None:
        self.lag_s += _WEIGHT * (max(0.0, overshoot_s) - self.lag_s)

    async def _run(self) -> None:
        while True:
            before = self._clock()
            await asyncio.sleep(self.tick_s)
            self.observe(self._clock() - before - self.tick_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class Admission:
    """One model's admission: batch times observed, requests admitted or refused."""

    def __init__(self, objective_ms: float, lag: LoopLag) -> None:
        self.objective_ms = objective_ms
        self.lag = lag
        self.batch_ms: float | None = None  # None: no batch has run yet
        self.refused = 0

    def observe(self, process_ms: float) -> None:
        """One batch's feature read + predict time (the batcher's on_batch)."""
        if self.batch_ms is None:
            self.batch_ms = process_ms
        else:
            self.batch_ms += _WEIGHT * (process_ms - self.batch_ms)

    def predicted_ms(self, queued: int, rows: int, size: int) -> float:
        """When a request of ``rows`` rows would be answered, from now (see the module)."""
        if self.batch_ms is None:
            return 0.0
        batches = math.ceil((queued + rows) / max(size, 1))
        return self.lag.lag_s * 1000 + batches * self.batch_ms

    def admit(self, queued: int, rows: int, size: int) -> float | None:
        """None to admit; else the predicted time (ms), the request refused and counted."""
        predicted = self.predicted_ms(queued, rows, size)
        if queued == 0 or predicted <= self.objective_ms:
            return None
        self.refused += 1
        return predicted
