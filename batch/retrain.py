"""`sluice retrain`: a challenger per service on the newest labelled period, against production.

For each feature service of the definitions' ``Labels`` declarations (features/labels.py):

1. The period: label rows (batch.train.build_labels) whose time lies in ``[until - period,
   until)``; ``until`` defaults to the newest label time rounded up to the next whole hour, so
   that cron runs within the same hour of labels see the same period. Its name,
   ``<start>_<end>`` in compact UTC ISO times, keys the decision: a period already decided
   prints its recorded decision and does nothing (unless forced).
2. One point-in-time training set of the period (batch.training.training_set, the contract
   serving uses); the newest ``eval_fraction`` of its label times is held out
   (models.fit.time_split).
3. The challenger: LightGBM on the earlier rows (models.fit), warm-started from the champion's
   trees when the champion reads exactly the same inputs (``init_model``).
4. The champion (the production version) predicts the same held-out rows from the same
   training set, its inputs taken in its own order from its metadata; a champion that reads
   a feature the definitions no longer provide cannot be evaluated (and could not be served).
5. Sanity gates on both (``feature_gate``, ``prediction_gates``), then ``decide``: promote only
   when the challenger passes every gate and its MAE is at least ``margin`` (relative; setting
   ``retrain_margin``) below the champion's, or when there is no champion to beat (none, not
   evaluable, or failing its own gates).
6. The challenger is saved as a new version either way; when promoted it becomes production.
   The decision and its numbers go to the registry's decisions log
   (``<name>/decisions/<period>.json``). A running predictor keeps its version until it is
   restarted or told (POST /models/{name}/versions/{v}:promote). The decision is written last:
   a run that dies before it leaves no decision, and the next run decides the period afresh
   (one more version saved, nothing promoted twice by mistake). One run at a time per model,
   as for `sluice train`.

Canary releases: the settings have no canary yet; a promotion here is a full one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from batch.errors import TrainError
from core.errors import UsageError
from core.settings import Settings
from features.definitions import FeatureService, empty_value
from features.labels import EVENT_TIMESTAMP
from models.registry import CandidateResult, GateResult, ModelMetadata, RetrainDecision

if TYPE_CHECKING:
    import numpy.typing as npt
    from rich.console import Console

    from models.registry import ModelRegistry

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
DEFAULT_PERIOD_MS = 7 * DAY_MS
# Predictions must lie within the training labels' range widened by this many times its width
# on each side: a regression tree cannot leave the label range, a broken one can.
RANGE_WIDEN = 1.0
_UNITS = {"m": 60_000, "h": HOUR_MS, "d": DAY_MS, "w": 7 * DAY_MS}


def parse_period(text: str) -> int:
    """'7d', '12h', '90m', '2w' as milliseconds; UsageError naming the value otherwise."""
    value, unit = text.strip()[:-1], text.strip()[-1:].lower()
    if unit not in _UNITS or not value.isdigit() or int(value) < 1:
        raise UsageError(f"--period {text!r}: expected a whole number and m, h, d or w (7d)")
    return int(value) * _UNITS[unit]


def period_bounds(newest_ms: int, period_ms: int, until_ms: int | None = None) -> tuple[int, int]:
    """[start, end) of the label times to use: end is ``until`` or the newest label rounded up
    to the next whole hour (exclusive)."""
    end = until_ms if until_ms is not None else (newest_ms // HOUR_MS + 1) * HOUR_MS
    return end - period_ms, end


def period_name(bounds: tuple[int, int]) -> str:
    return "_".join(
        datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y%m%dT%H%M%SZ") for ms in bounds
    )


def input_columns(refs: Sequence[str], service: FeatureService) -> list[str] | str:
    """The training-set column of each model input ('view:feature' -> 'view__feature',
    'request:field' -> 'field'), or why the service cannot provide one."""
    views = {v.name: {s.name for s in v.features()} for v in service.views}
    fields = {f.name for r in service.request for f in r.fields}
    out = []
    for ref in refs:
        group, _, name = ref.partition(":")
        if name in views.get(group, ()):
            out.append(f"{group}__{name}")
        elif name in fields:
            out.append(name)
        else:
            return f"reads {ref!r}, which service {service.name!r} no longer provides"
    return out


def empties(refs: Sequence[str], service: FeatureService) -> dict[str, Any]:
    """Per input: the value an empty window gives (count 0, sum 0.0, else None)."""
    specs = {f"{v.name}:{s.name}": s for v in service.views for s in v.features()}
    return {ref: empty_value(specs[ref].function) if ref in specs else None for ref in refs}


def feature_gate(
    frame: pd.DataFrame, columns: Mapping[str, str], empty: Mapping[str, Any]
) -> GateResult:
    """No input is entirely missing: each has a value that is neither null nor its empty value
    in some row of the period (a view with no row at any label time reads as empty values)."""
    missing = []
    for ref, column in columns.items():
        values = frame[column] if column in frame.columns else pd.Series(dtype=float)
        present = values.notna()
        if empty.get(ref) is not None:
            present &= values != empty[ref]
        if not bool(present.any()):
            missing.append(ref)
    detail = f"no value in any row: {', '.join(missing)}" if missing else ""
    return GateResult(name="features_present", passed=not missing, detail=detail)


def prediction_gates(
    predictions: npt.NDArray[np.float64],
    label_range: tuple[float, float],
    widen: float = RANGE_WIDEN,
) -> list[GateResult]:
    """Finite; within the label range widened by ``widen`` times its width each side; not
    constant (unless the labels are)."""
    finite = np.isfinite(predictions)
    out = [
        GateResult(
            name="finite",
            passed=bool(finite.all()),
            detail="" if finite.all() else f"{int((~finite).sum())} of {len(finite)} not finite",
        )
    ]
    lo, hi = label_range
    width = hi - lo
    bounds = (lo - widen * width, hi + widen * width)
    shown = predictions[finite]
    outside = int(((shown < bounds[0]) | (shown > bounds[1])).sum())
    out.append(
        GateResult(
            name="in_range",
            passed=outside == 0,
            detail=f"{outside} outside [{bounds[0]:.6g}, {bounds[1]:.6g}]" if outside else "",
        )
    )
    constant = len(shown) > 1 and float(np.ptp(shown)) == 0.0 and width > 0
    out.append(
        GateResult(
            name="not_constant",
            passed=not constant,
            detail=f"every prediction is {shown[0]:.6g}" if constant else "",
        )
    )
    return out


def failed(gates: Sequence[GateResult]) -> str:
    return "; ".join(
        f"{g.name} ({g.detail})" if g.detail else g.name for g in gates if not g.passed
    )


def decide(
    champion: CandidateResult | None, challenger: CandidateResult, margin: float
) -> tuple[bool, str, float | None]:
    """(promote, reason, improvement = 1 - challenger MAE / champion MAE)."""
    if challenger.mae is None or failed(challenger.gates):
        return False, f"challenger fails its gates: {failed(challenger.gates)}", None
    if champion is None:
        return True, "no production version", None
    if champion.mae is None:
        return True, f"the champion cannot be evaluated: {champion.note}", None
    improvement = (
        1 - challenger.mae / champion.mae
        if champion.mae > 0
        else (0.0 if challenger.mae == 0 else -math.inf)
    )
    if failed(champion.gates):
        return True, f"the champion fails its gates: {failed(champion.gates)}", improvement
    numbers = f"MAE {challenger.mae:.6g} against {champion.mae:.6g} ({improvement:+.2%})"
    if challenger.mae < champion.mae and improvement >= margin:
        return True, f"{numbers}: better by at least the margin {margin:.2%}", improvement
    return False, f"{numbers}: not better by the margin {margin:.2%}", improvement


@dataclass(frozen=True)
class RetrainOutcome:
    decision: RetrainDecision
    skipped: bool  # decided before: nothing was trained


@dataclass(frozen=True)
class RetrainReport:
    outcomes: list[RetrainOutcome]


def retrain(
    settings: Settings,
    services: Sequence[str] | None = None,
    *,
    period_ms: int = DEFAULT_PERIOD_MS,
    until_ms: int | None = None,
    eval_fraction: float = 0.2,
    margin: float | None = None,
    rounds: int = 200,
    warm_start: bool = True,
    force: bool = False,
    params: Mapping[str, Any] | None = None,
) -> RetrainReport:
    """Decide every named service (default: every service of every Labels declaration)."""
    from batch.train import build_labels, plan
    from features.registry import load_registry
    from models.registry import ModelRegistry

    margin = settings.retrain_margin if margin is None else margin
    registry = load_registry(settings.definitions_module)
    models = ModelRegistry.from_settings(settings)
    outcomes: list[RetrainOutcome] = []
    for labels_name, group in plan(registry, services).items():
        rows = build_labels(settings, registry, registry.labels[labels_name])
        times = rows.frame[EVENT_TIMESTAMP]
        bounds = period_bounds(int(times.max()), period_ms, until_ms)
        name = period_name(bounds)
        todo = []
        for service in group:
            known = None if force else models.decision(service.name, name)
            if known is not None:
                outcomes.append(RetrainOutcome(known, skipped=True))
            else:
                todo.append(service)
        if not todo:
            continue
        frame = rows.frame[(times >= bounds[0]) & (times < bounds[1])].reset_index(drop=True)
        if frame.empty:
            raise TrainError(f"labels {labels_name!r}: no label in period {name}")
        for service in todo:
            decision = _decide_service(
                settings,
                models,
                service,
                frame,
                label=rows.labels.label,
                bounds=bounds,
                eval_fraction=eval_fraction,
                margin=margin,
                rounds=rounds,
                warm_start=warm_start,
                params=params,
            )
            outcomes.append(RetrainOutcome(decision, skipped=False))
    return RetrainReport(outcomes)


def _decide_service(
    settings: Settings,
    models: ModelRegistry,
    service: FeatureService,
    labels: pd.DataFrame,
    *,
    label: str,
    bounds: tuple[int, int],
    eval_fraction: float,
    margin: float,
    rounds: int,
    warm_start: bool,
    params: Mapping[str, Any] | None,
) -> RetrainDecision:
    from batch.session import spark_session
    from batch.training import training_set
    from models.errors import ModelError
    from models.fit import fit, model_features, time_split

    spark = spark_session(settings)
    frame = training_set(spark, settings, service, spark.createDataFrame(labels)).toPandas()
    frame = frame.sort_values(EVENT_TIMESTAMP, kind="stable").reset_index(drop=True)
    frame = frame[frame[label].notna()]
    period = period_name(bounds)
    try:
        train, test = time_split(frame, eval_fraction)
        champion_version = models.production(service.name)
        champion_meta = (
            models.metadata(service.name, champion_version) if champion_version else None
        )
        champion_text = (
            models.model_text(service.name, champion_version) if champion_version else None
        )
        refs = [ref for ref, _ in model_features(service)]
        warm = bool(warm_start and champion_meta is not None and champion_meta.features == refs)
        trained = fit(
            frame,
            service,
            label=label,
            eval_fraction=eval_fraction,
            rounds=rounds,
            params=params,
            notes={"retrain": period, "warm_start_from": champion_version if warm else None},
            init_model=champion_text if warm else None,
        )
    except ModelError as exc:
        raise TrainError(f"service {service.name!r}, period {period}: {exc}") from exc
    y_train = train[label].astype("float64").to_numpy()
    label_range = (float(y_train.min()), float(y_train.max()))
    y_test = test[label].astype("float64").to_numpy()
    challenger_columns = dict(model_features(service))
    challenger_gates = [
        feature_gate(frame, challenger_columns, empties(refs, service)),
        *prediction_gates(trained.eval_predictions, label_range),
    ]
    champion = None
    if champion_meta is not None and champion_text is not None:
        champion = _evaluate_champion(
            champion_meta, champion_text, service, frame, test, y_test, label_range
        )
    stored = models.save(trained.model_text, trained.metadata)
    challenger = CandidateResult(
        version=stored.version, mae=trained.metadata.metrics.mae, gates=challenger_gates
    )
    promote, reason, improvement = decide(champion, challenger, margin)
    if promote:
        models.promote(service.name, stored.version)
    decision = RetrainDecision(
        model=service.name,
        period=period,
        period_ms=bounds,
        outcome="promoted" if promote else "refused",
        reason=reason,
        margin=margin,
        improvement=improvement if improvement is None or math.isfinite(improvement) else None,
        champion=champion,
        challenger=challenger,
        rows_train=len(train),
        rows_eval=len(test),
        eval_window_ms=trained.metadata.eval_window_ms,
        warm_start=warm,
        notes={"rounds": rounds, "eval_fraction": eval_fraction},
    )
    models.record_decision(decision)
    return decision


def _evaluate_champion(
    meta: ModelMetadata,
    model_text: str,
    service: FeatureService,
    frame: pd.DataFrame,
    test: pd.DataFrame,
    y_test: npt.NDArray[np.float64],
    label_range: tuple[float, float],
) -> CandidateResult:
    """The production model on the held-out rows, its inputs in its own order."""
    import lightgbm as lgb

    from models.fit import to_matrix

    columns = input_columns(meta.features, service)
    if isinstance(columns, str):
        return CandidateResult(version=meta.version, mae=None, note=columns)
    booster = lgb.Booster(model_str=model_text)
    if booster.num_feature() != len(columns):
        note = f"has {booster.num_feature()} inputs, its metadata lists {len(columns)}"
        return CandidateResult(version=meta.version, mae=None, note=note)
    predicted = np.asarray(booster.predict(to_matrix(test, columns)), dtype=np.float64)
    gates = [
        feature_gate(
            frame, dict(zip(meta.features, columns, strict=True)), empties(meta.features, service)
        ),
        *prediction_gates(predicted, label_range),
    ]
    mae = float(np.mean(np.abs(predicted - y_test))) if np.isfinite(predicted).all() else None
    note = "" if mae is not None else "predictions not finite"
    return CandidateResult(version=meta.version, mae=mae, gates=gates, note=note)


def print_retrain_report(console: Console, report: RetrainReport) -> None:
    """One row per model: period, champion and challenger MAE, the decision and why."""
    from rich.table import Table

    table = Table("model", "period", "champion", "challenger", "improvement", "decision")
    for outcome in report.outcomes:
        d = outcome.decision
        table.add_row(
            d.model,
            d.period,
            _candidate(d.champion),
            _candidate(d.challenger),
            "" if d.improvement is None else f"{d.improvement:+.2%}",
            f"{d.outcome} before" if outcome.skipped else d.outcome,
        )
    console.print(table)
    for outcome in report.outcomes:
        d = outcome.decision
        before = f"decided before ({d.decided_at[:19]}), nothing done: " if outcome.skipped else ""
        line = f"{d.model} {d.period}: {before}{d.outcome}: {d.reason}"
        console.print(line, highlight=False, soft_wrap=True)


def _candidate(candidate: CandidateResult | None) -> str:
    if candidate is None:
        return "none"
    mae = "not evaluated" if candidate.mae is None else f"MAE {candidate.mae:.4g}"
    return f"v{candidate.version} {mae}"
