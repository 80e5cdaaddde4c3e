"""A served model (trees + feature plan) and the batch prediction step the batcher runs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from feature_repo.errors import OnlineStoreError
from features.definitions import FeatureService
from models.registry import ModelMetadata, ModelRegistry
from serving.cache import PredictionCache
from serving.errors import FeatureStoreUnavailableError, ModelIncompatibleError, ModelRegistryError
from serving.features import (
    FeaturePlan,
    FeatureReader,
    JoinedRow,
    ServeBehind,
    build_plan,
    join,
    read_rows,
)
from serving.features import to_matrix as rows_to_matrix


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One version, fully loaded: what a promote swaps in as a whole."""

    metadata: ModelMetadata
    booster: Any  # lightgbm.Booster
    plan: FeaturePlan

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> int:
        return self.metadata.version

    def predict(self, matrix: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
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
    return LoadedModel(metadata, booster, plan)


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


@dataclass(frozen=True)
class Prediction:
    prediction_id: str
    model: str
    version: int
    prediction: float
    time_ms: int
    joined: JoinedRow


def predict_batch(
    reader: FeatureReader,
    items: Sequence[PredictItem],
    now_ms: int | None = None,
    serve_behind: ServeBehind = "flag",
    cache: PredictionCache | None = None,
) -> list[Prediction]:
    """Read every feature the batch needs in one round trip, join (each row at its own t, see
    serving.features), predict per model version (through the cache, when given: only the
    input vectors it lacks reach the model)."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    try:
        lookup = read_rows(reader, [(item.model.plan, item.row) for item in items])
    except OnlineStoreError as exc:
        raise FeatureStoreUnavailableError(str(exc)) from exc
    groups: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(id(item.model), []).append(index)
    out: list[Prediction | None] = [None] * len(items)
    for indices in groups.values():
        model = items[indices[0]].model
        joined = [
            join(model.plan, items[i].row, lookup, now, items[i].t_ms, serve_behind)
            for i in indices
        ]
        matrix = rows_to_matrix(model.plan, joined)
        predicted = (
            model.predict(matrix)
            if cache is None
            else cache.predict(model.name, model.version, matrix, model.predict)
        )
        for i, row, value in zip(indices, joined, predicted, strict=True):
            out[i] = Prediction(uuid.uuid4().hex, model.name, model.version, float(value), now, row)
    return [p for p in out if p is not None]
