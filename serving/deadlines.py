"""Per-request deadlines: every /predict is answered within its time budget.

The budget: the request body's ``deadline_ms`` or the header ``X-Request-Timeout-Ms`` (the
smaller when both are given), else ``settings.request_deadline_ms``; never more than
``settings.request_deadline_max_ms`` (a larger one is capped, as gRPC servers cap deadlines).
It counts from the moment the route starts handling the request.

The route queues its rows for the model's batcher and waits for them until the budget, less
ANSWER_RESERVE_S kept to build and send the answer. Rows whose batch has not answered by then
are withdrawn (cancelled: a batch not yet run leaves them out) and, by
``settings.serve_store_unavailable``:

- "degraded": predicted at once from the views' empty values, flagged ``degraded`` with the
  reason "deadline" (serving.model.predict_degraded: no I/O, microseconds of LightGBM);
- "reject": the request is a 504 (DeadlineExceededError).

A batch that is stuck on the store therefore holds up nobody beyond their deadline; the read
itself is bounded by the Redis read timeout, and the breaker (serving/breaker.py) spares the
next batches even that.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence

from core.settings import Settings
from serving.errors import DeadlineExceededError, InvalidRequestError
from serving.model import Prediction, PredictItem, StoreUnavailable, predict_degraded

HEADER = "X-Request-Timeout-Ms"
# Kept from the budget to answer after the wait: degraded predictions for late rows, the
# prediction log, JSON. A few rows take well under a millisecond; 1000 rows about 2 ms.
ANSWER_RESERVE_S = 0.005


def budget_s(body_ms: float | None, header: str | None, settings: Settings) -> float:
    """The request's deadline in seconds from the body, the header and the settings."""
    given: list[float] = []
    if body_ms is not None:
        given.append(float(body_ms))
    if header is not None:
        try:
            value = float(header)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise InvalidRequestError(
                [
                    {
                        "field": f"header {HEADER}",
                        "reason": "expected a number of milliseconds greater than 0",
                        "input": header[:40],
                    }
                ]
            )
        given.append(value)
    ms = min(given) if given else settings.request_deadline_ms
    return min(ms, settings.request_deadline_max_ms) / 1000


async def predict_within(
    enqueue: Callable[[PredictItem, float], asyncio.Future[Prediction]],
    items: Sequence[PredictItem],
    budget: float,
    started: float,
    on_late: StoreUnavailable,
) -> list[Prediction]:
    """Every item's prediction by ``started + budget`` (perf_counter seconds), see above.

    Raises the first batch error of a row (e.g. FeatureStoreUnavailableError), QueueFullError
    when the batcher's queue is full (nothing stays queued then), DeadlineExceededError when
    rows are late and on_late is "reject".
    """
    futures: list[asyncio.Future[Prediction]] = []
    try:
        for item in items:
            futures.append(enqueue(item, started))  # arrival: the objective covers the queue
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    remaining = started + budget - ANSWER_RESERVE_S - time.perf_counter()
    if remaining > 0:
        await _all_done(futures, remaining)
    late = [i for i, future in enumerate(futures) if not future.done()]
    for i in late:
        futures[i].cancel()
    failed = [f.exception() for f in futures if f.done() and not f.cancelled()]  # all retrieved
    error = next((exc for exc in failed if exc is not None), None)
    if error is not None:
        raise error
    if late and on_late == "reject":
        raise DeadlineExceededError(
            f"{len(late)} of {len(items)} row(s) not answered within the deadline of "
            f"{budget * 1000:g} ms (set {HEADER} or deadline_ms, up to the server's maximum)"
        )
    results: list[Prediction | None] = [None if f.cancelled() else f.result() for f in futures]
    if late:
        fallback = predict_degraded([items[i] for i in late], "deadline")
        for i, prediction in zip(late, fallback, strict=True):
            results[i] = prediction
    return [p for p in results if p is not None]


async def _all_done(futures: Sequence[asyncio.Future[Prediction]], timeout: float) -> None:
    """Return when every future is done or after ``timeout`` seconds: asyncio.wait's
    semantics without its per-call set, type checks and task wrapping (on every request)."""
    pending = [future for future in futures if not future.done()]
    if not pending:
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    left = len(pending)

    def one_done(_future: asyncio.Future[Prediction]) -> None:
        nonlocal left
        left -= 1
        if left == 0 and not waiter.done():
            waiter.set_result(None)

    def expired() -> None:
        if not waiter.done():
            waiter.set_result(None)

    for future in pending:
        future.add_done_callback(one_done)
    timer = loop.call_later(timeout, expired)
    try:
        await waiter
    finally:
        timer.cancel()
        for future in pending:
            future.remove_done_callback(one_done)
