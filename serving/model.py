"""A served model (trees + feature plan) and the batch prediction step the batcher runs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from feature_repo.errors import OnlineStoreError, OnlineStoreUnavailableError
from features.definitions import FeatureService
from models.registry import ModelMetadata, ModelRegistry
from serving.breaker import BreakerOpenError
from serving.cache import PredictionCache
from serving.errors import FeatureStoreUnavailableError, ModelIncompatibleError, ModelRegistryError
from serving.features import (
    FeaturePlan,
    FeatureReader,
    JoinedRow,
    RowLookup,
    ServeBehind,
    build_plan,
    degraded_join,
    join,
    read_rows,
    read_rows_async,
)
from serving.features import to_matrix as rows_to_matrix
from serving.lgbm_rows import MAX_ROWS, SingleRowPredictor

StoreUnavailable = Literal["degraded", "reject"]


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One version, fully loaded: what a promote swaps in as a whole."""

    metadata: ModelMetadata
    booster: Any  # lightgbm.Booster
    plan: FeaturePlan
    # LightGBM's single-row API for batches of up to lgbm_rows.MAX_ROWS (serving/lgbm_rows.py);
    # None: every batch goes to booster.predict (a booster that is not LightGBM's).
    rows_predictor: SingleRowPredictor | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> int:
        return self.metadata.version

    def predict(self, matrix: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        if self.rows_predictor is not None and len(matrix) <= MAX_ROWS:
            return self.rows_predictor.predict(matrix)
        # One thread per predict: batches are small, and the server runs several at once.
        return np.asarray(self.booster.predict(matrix, num_threads=1), dtype=np.float64)


def model_from_text(
    model_text: str, metadata: ModelMetadata, services: Mapping[str, FeatureService]
) -> LoadedModel:
    import lightgbm as lgb

    service = services.get(metadata.feature_service)
    if service is None:
        raise ModelIncompatibleError(
            f"model {metadata.name!r} v{metadata.version} reads feature service "
            f"{metadata.feature_service!r}, which the definitions do not declare"
        )
    plan = build_plan(service, metadata.features)
    try:
        booster = lgb.Booster(model_str=model_text)
    except lgb.basic.LightGBMError as exc:
        raise ModelRegistryError(f"model {metadata.name!r} v{metadata.version}: {exc}") from None
    if booster.num_feature() != len(plan.inputs):
        raise ModelIncompatibleError(
            f"model {metadata.name!r} v{metadata.version} has {booster.num_feature()} inputs "
            f"but its metadata lists {len(plan.inputs)} features"
        )
    return LoadedModel(metadata, booster, plan, SingleRowPredictor(booster))


def load_model(
    registry: ModelRegistry, services: Mapping[str, FeatureService], name: str, version: int
) -> LoadedModel:
    metadata = registry.metadata(name, version)
    return model_from_text(registry.model_text(name, version), metadata, services)


@dataclass(frozen=True)
class PredictItem:
    model: LoadedModel  # chosen when the request was queued
    row: Mapping[str, Any]  # validated: entity keys and request features
    # t of the availability contract: the request's arrival, or the row's event_time (replays);
    # None: when the batch reads its features.
    t_ms: int | None = None
    # The probability the selection gave this version (ModelSlot.pick); None: no choice made
    # (the caller named the version, a shadow, an Exp4 ensemble).
    propensity: float | None = None


@dataclass(frozen=True)
class Prediction:
    prediction_id: str
    model: str
    version: int
    prediction: float
    time_ms: int
    joined: JoinedRow
    ensemble: dict[str, Any] | None = None  # Exp4 (serving/ensemble.py): who answered, weights
    propensity: float | None = None  # PredictItem.propensity of the row


def earliest_t(items: Sequence[PredictItem], now_ms: int) -> int:
    """The earliest t the batch's rows are joined at (a row without one: now)."""
    return min((now_ms if item.t_ms is None else item.t_ms for item in items), default=now_ms)


def predict_batch(
    reader: FeatureReader,
    items: Sequence[PredictItem],
    now_ms: int | None = None,
    serve_behind: ServeBehind = "flag",
    on_unavailable: StoreUnavailable = "reject",
    cache: PredictionCache | None = None,
) -> list[Prediction]:
    """Read every feature the batch needs in one round trip, join (each row at its own t, see
    serving.features), predict per model version (through the cache, when given: only the
    input vectors it lacks reach the model).

    When the store is slow or down (OnlineStoreUnavailableError, the breaker's refusal too),
    "reject" raises FeatureStoreUnavailableError (503) and "degraded" predicts every row from
    the views' empty values, flagged (predict_degraded)."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    needs = [(item.model.plan, item.row) for item in items]
    try:
        lookup = read_rows(reader, needs, earliest_t(items, now))
    except OnlineStoreError as exc:
        return _unavailable(items, exc, now, on_unavailable, cache)
    return _predict_joined(items, lookup, now, serve_behind, cache)


async def predict_batch_async(
    reader: Any,
    items: Sequence[PredictItem],
    now_ms: int | None = None,
    serve_behind: ServeBehind = "flag",
    on_unavailable: StoreUnavailable = "reject",
    cache: PredictionCache | None = None,
) -> list[Prediction]:
    """predict_batch with the feature read on the event loop (a reader whose ``reads_async``
    is true: serving/breaker.py). The model runs on the loop too: LightGBM on the few rows
    of a batch costs less than handing the batch to a thread (feature_repo/redis_wire.py)."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    needs = [(item.model.plan, item.row) for item in items]
    try:
        lookup = await read_rows_async(reader, needs, earliest_t(items, now))
    except OnlineStoreError as exc:
        return _unavailable(items, exc, now, on_unavailable, cache)
    return _predict_joined(items, lookup, now, serve_behind, cache)


def _unavailable(
    items: Sequence[PredictItem],
    exc: OnlineStoreError,
    now: int,
    on_unavailable: StoreUnavailable,
    cache: PredictionCache | None,
) -> list[Prediction]:
    if not isinstance(exc, OnlineStoreUnavailableError) or on_unavailable == "reject":
        raise FeatureStoreUnavailableError(str(exc)) from exc
    reason = "breaker_open" if isinstance(exc, BreakerOpenError) else "store_unavailable"
    return predict_degraded(items, reason, now, cache)


def _predict_joined(
    items: Sequence[PredictItem],
    lookup: RowLookup,
    now: int,
    serve_behind: ServeBehind,
    cache: PredictionCache | None,
) -> list[Prediction]:
    return _predict(
        items,
        lambda item: join(item.model.plan, item.row, lookup, now, item.t_ms, serve_behind),
        now,
        cache,
    )


def predict_degraded(
    items: Sequence[PredictItem],
    reason: str,
    now_ms: int | None = None,
    cache: PredictionCache | None = None,
) -> list[Prediction]:
    """Predictions without the online store: every view's empty values, flagged ``degraded``
    with ``reason``. Cheap (no I/O; LightGBM on a few rows takes microseconds), so the event
    loop may call it when a request's deadline comes before its batch."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    return _predict(
        items,
        lambda item: degraded_join(
            item.model.plan, item.row, now if item.t_ms is None else item.t_ms, reason
        ),
        now,
        cache,
    )


def _predict(
    items: Sequence[PredictItem],
    joiner: Callable[[PredictItem], JoinedRow],
    now: int,
    cache: PredictionCache | None = None,
) -> list[Prediction]:
    groups: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(id(item.model), []).append(index)
    out: list[Prediction | None] = [None] * len(items)
    for indices in groups.values():
        model = items[indices[0]].model
        joined = [joiner(items[i]) for i in indices]
        matrix = rows_to_matrix(model.plan, joined)
        predicted = (
            model.predict(matrix)
            if cache is None
            else cache.predict(model.name, model.version, matrix, model.predict)
        )
        for i, row, value in zip(indices, joined, predicted, strict=True):
            out[i] = Prediction(
                uuid.uuid4().hex,
                model.name,
                model.version,
                float(value),
                now,
                row,
                propensity=items[i].propensity,
            )
    return [p for p in out if p is not None]
