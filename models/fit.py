"""Fitting and evaluating a LightGBM model on a training set held in pandas (no engine here).

The training set is what batch.training.training_set returns: label columns, the entity keys,
``event_timestamp`` and ``<view>__<feature>`` for every view feature of the service; request
features are label columns named after their field. The model's input order is the service's
feature_refs() order, stored in the metadata; serving builds its vectors in that order.

Evaluation is on a later time slice (the newest ``eval_fraction`` of label times), as a model is
used on the future; a naive baseline that predicts the training mean is reported next to it.

Every fit also describes what the model saw (``training_reference``): per input, a sorted
sample or quantile sketch of at most REFERENCE_POINTS values and the null rate (numeric), or
value shares (bool and string), and the same sketch of its predictions on all training rows.
The registry stores it beside the metadata; `sluice monitor` measures drift against it.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from features.definitions import FeatureService
from features.schema import FieldType
from models.errors import TrainingDataError
from models.registry import (
    CategoricalReference,
    Metrics,
    ModelMetadata,
    NumericReference,
    TrainingReference,
)

if TYPE_CHECKING:
    import numpy.typing as npt

TIME_COLUMN = "event_timestamp"
# Deterministic, small and fast: the example has a few thousand labels.
DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "regression",
    "metric": "l1",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 20,
    "feature_fraction": 0.9,
    "seed": 7,
    "deterministic": True,
    "num_threads": 2,
    "verbose": -1,
}
DEFAULT_ROUNDS = 200
_NUMERIC = (FieldType.INT, FieldType.FLOAT, FieldType.BOOL)
# Points kept per numeric feature in the training reference (all values when fewer), and the
# most frequent values kept per categorical one.
REFERENCE_POINTS = 1000
REFERENCE_CATEGORIES = 50


def model_features(service: FeatureService) -> list[tuple[str, str]]:
    """(reference, training-set column) for every input of the service's model, in order.

    'view:feature' -> 'view__feature' (batch.training.feature_column's convention; a unit test
    pins the two together) and 'request:field' -> 'field' (request features are label columns).

    Only numeric features can feed LightGBM; a string or timestamp feature is refused here, at
    training time, rather than by a model that cannot be served.
    """
    out = []
    for view in service.views:
        for spec in view.features():
            if spec.dtype not in _NUMERIC:
                raise TrainingDataError(
                    f"service {service.name!r}: feature {view.name}:{spec.name} is "
                    f"{spec.dtype}; models take int, float and bool features"
                )
            out.append((f"{view.name}:{spec.name}", f"{view.name}__{spec.name}"))
    for request in service.request:
        for field in request.fields:
            if field.type not in _NUMERIC:
                raise TrainingDataError(
                    f"service {service.name!r}: request feature {request.name}:{field.name} "
                    f"is {field.type}; models take int, float and bool features"
                )
            out.append((f"{request.name}:{field.name}", field.name))
    return out


def to_matrix(frame: pd.DataFrame, columns: Sequence[str]) -> npt.NDArray[np.float64]:
    """The model input: float64, nulls as NaN (which LightGBM treats as missing)."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise TrainingDataError(f"training set lacks columns {missing}")
    return frame[list(columns)].astype("float64").to_numpy(dtype=np.float64, na_value=np.nan)


@dataclass(frozen=True)
class TrainedModel:
    model_text: str  # LightGBM's native text format
    metadata: ModelMetadata
    eval_predictions: npt.NDArray[np.float64]


def time_split(
    frame: pd.DataFrame, eval_fraction: float, time_column: str = TIME_COLUMN
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Earlier rows to train, the newest eval_fraction of label times to evaluate.

    The cut is a time: rows sharing the cut time all go to evaluation, so no instant is in both.
    """
    if not 0 < eval_fraction < 1:
        raise TrainingDataError("eval_fraction must lie strictly between 0 and 1")
    if time_column not in frame.columns:
        raise TrainingDataError(f"training set lacks the time column {time_column!r}")
    times = _epoch_ms(frame[time_column])
    cut = int(np.quantile(times, 1 - eval_fraction, method="higher")) if len(times) else 0
    train, test = frame[times < cut], frame[times >= cut]
    if len(train) < 10 or len(test) < 1:
        raise TrainingDataError(
            f"{len(frame)} labelled rows leave {len(train)} to train and {len(test)} to "
            "evaluate; produce and backfill more history"
        )
    return train, test


def _epoch_ms(series: pd.Series[Any]) -> npt.NDArray[np.int64]:
    if pd.api.types.is_datetime64_any_dtype(series):
        # Whatever the stored unit (ns from pandas, us from Spark), as epoch milliseconds.
        millis = pd.to_datetime(series, utc=True).dt.as_unit("ms").astype("int64")
        return np.asarray(millis, dtype=np.int64)
    return np.asarray(series.astype("int64"), dtype=np.int64)


def _window(frame: pd.DataFrame, time_column: str) -> tuple[int, int]:
    times = _epoch_ms(frame[time_column])
    return int(times.min()), int(times.max()) + 1


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("lightgbm", "numpy", "pandas", "sluice"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def fit(
    frame: pd.DataFrame,
    service: FeatureService,
    *,
    label: str,
    name: str | None = None,
    eval_fraction: float = 0.2,
    time_column: str = TIME_COLUMN,
    params: Mapping[str, Any] | None = None,
    rounds: int = DEFAULT_ROUNDS,
    notes: Mapping[str, Any] | None = None,
    init_model: str | None = None,
) -> TrainedModel:
    """Train on the earlier slice, evaluate MAE on the later one; metadata ready to save.

    ``init_model``: the text of a model with the same inputs to continue boosting from (a warm
    start: its trees stay, ``rounds`` more are added).
    """
    import lightgbm as lgb

    features = model_features(service)
    columns = [column for _, column in features]
    if label not in frame.columns:
        raise TrainingDataError(f"training set lacks the label column {label!r}")
    frame = frame[frame[label].notna()]
    train, test = time_split(frame, eval_fraction, time_column)
    merged = DEFAULT_PARAMS | dict(params or {})
    y_train = train[label].astype("float64").to_numpy()
    y_test = test[label].astype("float64").to_numpy()
    dataset = lgb.Dataset(
        to_matrix(train, columns), label=y_train, feature_name=_safe_names(columns)
    )
    start = lgb.Booster(model_str=init_model) if init_model is not None else None
    booster = lgb.train(merged, dataset, num_boost_round=rounds, init_model=start)
    predicted = np.asarray(booster.predict(to_matrix(test, columns)), dtype=np.float64)
    metrics = Metrics(
        mae=float(np.mean(np.abs(predicted - y_test))),
        mae_mean_baseline=float(np.mean(np.abs(float(np.mean(y_train)) - y_test))),
        rows_train=len(train),
        rows_eval=len(test),
    )
    meta = ModelMetadata(
        name=name or service.name,
        feature_service=service.name,
        features=[ref for ref, _ in features],
        label=label,
        train_window_ms=_window(train, time_column),
        eval_window_ms=_window(test, time_column),
        metrics=metrics,
        params={**merged, "rounds": rounds},
        library_versions=library_versions(),
        notes=dict(notes or {}),
        reference=training_reference(
            frame,
            features,
            np.asarray(booster.predict(to_matrix(frame, columns)), dtype=np.float64),
            categorical=categorical_features(service),
        ),
    )
    return TrainedModel(booster.model_to_string(), meta, predicted)


def categorical_features(service: FeatureService) -> set[str]:
    """References of the service's bool and string inputs: compared by value shares."""
    kinds = (FieldType.BOOL, FieldType.STRING)
    out = {f"{v.name}:{s.name}" for v in service.views for s in v.features() if s.dtype in kinds}
    for request in service.request:
        out |= {f"{request.name}:{f.name}" for f in request.fields if f.type in kinds}
    return out


def category(value: Any) -> str:
    """A categorical value as the reference and the monitor key it: true/false, else str()."""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def numeric_reference(values: npt.ArrayLike, points: int = REFERENCE_POINTS) -> NumericReference:
    """The sketch of one numeric column: nulls (None, NaN) counted, the rest sorted or sketched."""
    raw = np.asarray(pd.to_numeric(pd.Series(values, dtype=object), errors="coerce"), dtype=float)
    present = np.sort(raw[~np.isnan(raw)])
    total = len(raw)
    if len(present) > points:
        # Values that occur (no interpolation): discrete features keep their atoms.
        sample = np.quantile(present, (np.arange(points) + 0.5) / points, method="inverted_cdf")
    else:
        sample = present
    return NumericReference(
        count=len(present),
        null_rate=float(1 - len(present) / total) if total else 0.0,
        mean=float(present.mean()) if len(present) else None,
        std=float(present.std()) if len(present) else None,
        sample=[float(x) for x in sample],
    )


def categorical_reference(
    values: Sequence[Any] | pd.Series[Any], keep: int = REFERENCE_CATEGORIES
) -> CategoricalReference:
    series = pd.Series(list(values), dtype=object)
    present = series[series.notna()]
    counts = present.map(category).value_counts()
    shares = (counts / len(present)).to_dict() if len(present) else {}
    top = dict(list(shares.items())[:keep])
    rest = 1.0 - sum(top.values())
    if len(shares) > keep and rest > 0:
        top[CategoricalReference.OTHER] = rest
    return CategoricalReference(
        count=len(present),
        null_rate=float(1 - len(present) / len(series)) if len(series) else 0.0,
        frequencies={str(k): float(v) for k, v in top.items()},
    )


def training_reference(
    frame: pd.DataFrame,
    features: Sequence[tuple[str, str]],
    predictions: npt.NDArray[np.float64] | None,
    *,
    categorical: set[str] | frozenset[str] = frozenset(),
) -> TrainingReference:
    """The reference of a training set: (reference, column) pairs as model_features gives."""
    out: dict[str, NumericReference | CategoricalReference] = {}
    for ref, column in features:
        values = frame[column]
        out[ref] = (
            categorical_reference(values) if ref in categorical else numeric_reference(values)
        )
    return TrainingReference(
        rows=len(frame),
        features=out,
        prediction=None if predictions is None else numeric_reference(predictions),
    )


def _safe_names(columns: Sequence[str]) -> list[str]:
    # LightGBM refuses some JSON-special characters in names; ours are identifiers and "__".
    return [c.replace(":", "__") for c in columns]
