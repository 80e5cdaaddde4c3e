"""Live error: feedback labels joined to predictions by prediction id, MAE per model version.

A feedback record carries the prediction when the server still knew it (``matched``);
otherwise it is joined here with the prediction log, in either order of arrival: predictions
are remembered (the newest ``max_predictions``) and feedback that arrives before its
prediction waits (the newest ``max_pending``). A prediction's label counts once (a repeated
feedback record, e.g. replayed after a restart, is ignored).

Per period (by the feedback's time) and version, one ``live_error`` record: the labels, the
MAE and mean error (label - prediction), the MAE recorded at training (metadata.metrics.mae)
and their ratio. Band: the ratio, < 1.2 none, 1.2 - 1.5 possible, above drift, from
MIN_LABELS labels on (``unknown`` below, or without a training MAE). ``totals`` keeps the MAE
of the whole run per version.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from core.records import FeedbackRecord, PredictionRecord
from monitoring.drift import Stamp
from monitoring.records import MonitorRecord
from monitoring.stats import MAE_RATIO_BANDS, band_of, threshold_of

MIN_LABELS = 20
Version = tuple[str, int]  # (model, version)


@dataclass(frozen=True)
class Labelled:
    """A label joined with its prediction."""

    model: str
    version: int
    prediction: float
    label: float
    time_ms: int  # the feedback's

    @property
    def error(self) -> float:
        return self.label - self.prediction


@dataclass
class ErrorTotals:
    labels: int = 0
    abs_error: float = 0.0

    @property
    def mae(self) -> float | None:
        return self.abs_error / self.labels if self.labels else None


class FeedbackJoin:
    """Joins feedback to predictions; each prediction's label once."""

    def __init__(self, max_predictions: int = 1_000_000, max_pending: int = 100_000) -> None:
        self.max_predictions = max_predictions
        self.max_pending = max_pending
        self._predictions: OrderedDict[str, tuple[str, int, float]] = OrderedDict()
        self._pending: OrderedDict[str, FeedbackRecord] = OrderedDict()
        self._labelled: OrderedDict[str, None] = OrderedDict()
        self.duplicates = 0
        self.unmatched_dropped = 0  # feedback whose prediction never came (pushed out)
        self.totals: dict[Version, ErrorTotals] = {}

    def _remember(self, store: OrderedDict[str, None], key: str) -> None:
        store[key] = None
        if len(store) > self.max_predictions:
            store.popitem(last=False)

    def _join(self, feedback: FeedbackRecord, model: str, version: int, value: float) -> Labelled:
        self._remember(self._labelled, feedback.prediction_id)
        labelled = Labelled(model, version, value, feedback.label, feedback.time_ms)
        totals = self.totals.setdefault((model, version), ErrorTotals())
        totals.labels += 1
        totals.abs_error += abs(labelled.error)
        return labelled

    def on_prediction(self, record: PredictionRecord) -> list[Labelled]:
        """Remember a prediction; the feedback that was waiting for it, joined."""
        key = record.prediction_id
        self._predictions[key] = (record.model, record.model_version, record.prediction)
        if len(self._predictions) > self.max_predictions:
            self._predictions.popitem(last=False)
        waiting = self._pending.pop(key, None)
        if waiting is None or key in self._labelled:
            return []
        return [self._join(waiting, record.model, record.model_version, record.prediction)]

    def on_feedback(self, record: FeedbackRecord) -> Labelled | None:
        """The feedback joined with its prediction, or None (waiting, or a repeat)."""
        key = record.prediction_id
        if key in self._labelled:
            self.duplicates += 1
            return None
        if (
            record.matched
            and record.model is not None
            and record.model_version is not None
            and record.prediction is not None
        ):
            return self._join(record, record.model, record.model_version, record.prediction)
        known = self._predictions.get(key)
        if known is not None:
            return self._join(record, *known)
        self._pending[key] = record
        if len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)
            self.unmatched_dropped += 1
        return None

    @property
    def pending(self) -> int:
        return len(self._pending)


@dataclass
class ErrorAccumulator:
    """The labels of one model version that arrived in one period."""

    model: str
    version: int
    errors: list[float] = field(default_factory=list)

    def add(self, labelled: Labelled) -> None:
        self.errors.append(labelled.error)


def live_error_record(
    stamp: Stamp, acc: ErrorAccumulator, training_mae: float | None
) -> MonitorRecord:
    n = len(acc.errors)
    mae = sum(abs(e) for e in acc.errors) / n if n else None
    ratio = mae / training_mae if mae is not None and training_mae else None
    band = band_of(ratio, MAE_RATIO_BANDS) if n >= MIN_LABELS else "unknown"
    return MonitorRecord(
        check="live_error",
        period_start_ms=stamp.start_ms,
        period_end_ms=stamp.end_ms,
        model=acc.model,
        model_version=acc.version,
        rows=n,
        band=band,
        values={
            "mae": mae,
            "mean_error": sum(acc.errors) / n if n else None,
            "training_mae": training_mae,
            "mae_ratio": ratio,
            "decided_by": "mae_ratio",
            "threshold": threshold_of(band, MAE_RATIO_BANDS),
        },
        at_ms=stamp.at_ms,
    )
