"""Feature and prediction drift of one model version over one period, against the training
reference saved with the version (models.registry.TrainingReference).

The accumulator keeps, per input of the model ("view:feature", "request:field"), the values
the logged predictions gave it, and the predictions themselves; at the period's end
``drift_records`` turns them into one ``drift`` record per feature and one
``prediction_drift`` record (statistics and bands: monitoring/stats.py). A version without a
reference (saved before references existed) gives records of band ``unknown`` with
``values["reference"] = "none"``; so do periods with fewer than ``min_rows`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.records import PredictionRecord
from models.registry import CategoricalReference, NumericReference, TrainingReference
from monitoring.records import MonitorRecord
from monitoring.stats import DriftResult, categorical_drift, numeric_drift


@dataclass(frozen=True)
class Stamp:
    """The period a result covers and when it was computed (epoch ms)."""

    start_ms: int
    end_ms: int
    at_ms: int


@dataclass
class DriftAccumulator:
    """The logged inputs and predictions of one model version in one period."""

    model: str
    version: int
    rows: int = 0
    values: dict[str, list[Any]] = field(default_factory=dict)
    predictions: list[float] = field(default_factory=list)

    def add(self, record: PredictionRecord) -> None:
        self.rows += 1
        self.predictions.append(record.prediction)
        for ref, value in record.features.items():
            self.values.setdefault(ref, []).append(value)


def _record(
    stamp: Stamp, acc: DriftAccumulator, check: str, feature: str | None, result: DriftResult
) -> MonitorRecord:
    values = dict(result.values)
    if result.decided_by is not None:
        values |= {"decided_by": result.decided_by, "threshold": result.threshold}
    return MonitorRecord(
        check=check,
        period_start_ms=stamp.start_ms,
        period_end_ms=stamp.end_ms,
        model=acc.model,
        model_version=acc.version,
        feature=feature,
        rows=result.rows,
        band=result.band,
        values=values,
        at_ms=stamp.at_ms,
    )


def _unknown(rows: int, why: str) -> DriftResult:
    return DriftResult("unknown", rows, None, None, None, {"reference": why})


def drift_records(
    stamp: Stamp,
    acc: DriftAccumulator,
    reference: TrainingReference | None,
    min_rows: int,
) -> list[MonitorRecord]:
    """One ``drift`` record per logged feature and one ``prediction_drift`` record."""
    out = []
    features = sorted(acc.values)
    if reference is not None:
        features = sorted(set(features) | set(reference.features))
    for ref in features:
        values = acc.values.get(ref, [])
        feature_ref = reference.features.get(ref) if reference is not None else None
        if feature_ref is None:
            result = _unknown(len(values), "none" if reference is None else "feature")
        elif len(values) < min_rows:
            result = _unknown(len(values), "too few rows")
        elif isinstance(feature_ref, CategoricalReference):
            result = categorical_drift(values, feature_ref)
        else:
            result = numeric_drift(values, feature_ref)
        out.append(_record(stamp, acc, "drift", ref, result))
    prediction_ref: NumericReference | None = reference.prediction if reference else None
    if prediction_ref is None:
        result = _unknown(acc.rows, "none")
    elif acc.rows < min_rows:
        result = _unknown(acc.rows, "too few rows")
    else:
        result = numeric_drift(acc.predictions, prediction_ref)
    out.append(_record(stamp, acc, "prediction_drift", None, result))
    return out
