"""Ensembles with a straggler deadline (Clipper's Exp4 serving, Crankshaw et al. NSDI 2017).

For a batch, every arm of the slot (production and the other served versions) predicts on
the same feature read, each in its own thread. The batch waits ``deadline_s`` for them (the
clock starts when the models are handed their rows: the feature read is shared and comes
first); arms not back by then are stragglers, left out of the answer and named in it. The
answer is the mean of the arms that answered, weighted by the policy's weights for the row's
context (serving/selection.py: Exp4's w_i / sum w, renormalized over the arms that answered).

Too few answers (fewer than ``min_models``, capped at the number of arms): the answer is the
production version's prediction, flagged ``fallback``. Production is the version the fixed
policy would serve, so it is the one default that suits any model; if it is itself a
straggler the batch waits for it, since no other number can stand in for it.

A straggler keeps running in its thread after the batch answered. An arm still busy with an
earlier batch is not given the next one (it is named missing at once), so one slow version
can never pile work up or take every thread.

Each row's answer carries ``ensemble``: {"used": versions that answered in time, "missing":
the others, "fallback": bool, "predictions": {version: value}, "weights": {version: weight}};
the prediction log keeps it, and the feedback consumer updates each used version by its own
loss.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np
import numpy.typing as npt

from feature_repo.errors import OnlineStoreError, OnlineStoreUnavailableError
from serving.breaker import BreakerOpenError
from serving.errors import FeatureStoreUnavailableError
from serving.features import FeatureReader, JoinedRow, ServeBehind, join, read_rows, to_matrix
from serving.model import (
    LoadedModel,
    Prediction,
    PredictItem,
    StoreUnavailable,
    earliest_t,
    predict_degraded,
)
from serving.selection import ModelSlot

log = logging.getLogger("sluice.serving.ensemble")


class Ensemble:
    """Every arm of a slot predicts; stragglers past the deadline are cut and named."""

    def __init__(
        self,
        slot: ModelSlot,
        *,
        deadline_s: float,
        min_models: int,
        context_field: str = "",
        workers: int = 8,
    ) -> None:
        self.slot = slot
        self.deadline_s = deadline_s
        self.min_models = min_models
        self.context_field = context_field
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sluice-arm")
        self._busy: set[int] = set()
        self._lock = threading.Lock()
        self.missing: dict[int, int] = {}  # version -> rows answered without it
        self.fallbacks = 0

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _submit(
        self, version: int, arm: LoadedModel, matrix: npt.NDArray[np.float64]
    ) -> Future[npt.NDArray[np.float64]] | None:
        with self._lock:
            if version in self._busy:
                return None
            self._busy.add(version)
        future = self._executor.submit(arm.predict, matrix)

        def done(_future: Future[npt.NDArray[np.float64]]) -> None:
            with self._lock:
                self._busy.discard(version)

        future.add_done_callback(done)
        return future

    def predict(
        self,
        reader: FeatureReader,
        items: Sequence[PredictItem],
        now_ms: int | None = None,
        serve_behind: ServeBehind = "flag",
        on_unavailable: StoreUnavailable = "reject",
    ) -> list[Prediction]:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        state = self.slot.state  # one read: the whole batch uses one set of arms
        arms = dict(sorted(state.arms.items()))
        production = state.production.version
        try:
            lookup = read_rows(
                reader,
                [(a.plan, i.row) for a in arms.values() for i in items],
                earliest_t(items, now),
            )
        except OnlineStoreUnavailableError as exc:
            if on_unavailable == "reject":
                raise FeatureStoreUnavailableError(str(exc)) from exc
            # No features: no ensemble either; the chosen versions answer from empty values.
            reason = "breaker_open" if isinstance(exc, BreakerOpenError) else "store_unavailable"
            return predict_degraded(items, reason, now)
        except OnlineStoreError as exc:
            raise FeatureStoreUnavailableError(str(exc)) from exc
        joined = {
            v: [join(a.plan, i.row, lookup, now, i.t_ms, serve_behind) for i in items]
            for v, a in arms.items()
        }
        futures: dict[int, Future[npt.NDArray[np.float64]]] = {}
        for version, arm in arms.items():
            future = self._submit(version, arm, to_matrix(arm.plan, joined[version]))
            if future is not None:
                futures[version] = future
        wait(futures.values(), timeout=self.deadline_s)
        answers: dict[int, npt.NDArray[np.float64]] = {}
        for version, future in futures.items():
            if not future.done():
                continue
            error = future.exception()
            if error is not None:
                log.error("arm failed", extra={"version": version, "error": str(error)})
                continue
            answers[version] = future.result()
        in_time = sorted(answers)
        missing = [v for v in arms if v not in answers]
        for version in missing:
            self.missing[version] = self.missing.get(version, 0) + len(items)
        fallback = len(answers) < min(self.min_models, len(arms))
        if fallback:
            self.fallbacks += len(items)
            if production not in answers:  # production's answer is needed: wait for it
                future = futures.get(production)
                if future is None:  # busy with an earlier batch: predict here
                    matrix = to_matrix(state.production.plan, joined[production])
                    answers[production] = state.production.predict(matrix)
                else:
                    answers[production] = future.result()
        return [
            self._answer(
                i,
                item,
                production,
                arms,
                answers,
                in_time,
                missing,
                fallback,
                now,
                joined[production][i],
            )
            for i, item in enumerate(items)
        ]

    def _answer(
        self,
        index: int,
        item: PredictItem,
        production: int,
        arms: dict[int, LoadedModel],
        answers: dict[int, npt.NDArray[np.float64]],
        in_time: list[int],
        missing: list[int],
        fallback: bool,
        now: int,
        joined: JoinedRow,
    ) -> Prediction:
        context = str(item.row.get(self.context_field, "")) if self.context_field else ""
        weights = self.slot.policy.weights(list(arms), production, context)
        predictions = {v: float(answers[v][index]) for v in in_time}
        if fallback:
            value = float(answers[production][index])
        else:
            total = sum(weights[v] for v in in_time)
            value = sum(weights[v] * predictions[v] for v in in_time) / total
        info = {
            "used": in_time,
            "missing": missing,
            "fallback": fallback,
            "predictions": {str(v): p for v, p in predictions.items()},
            "weights": {str(v): round(weights[v], 6) for v in arms},
        }
        return Prediction(
            uuid.uuid4().hex, self.slot.name, production, value, now, joined, ensemble=info
        )
