"""`sluice retrain`'s sanity gates, decision rule, periods and decisions log, and `sluice
score`'s batch evaluation (LightGBM and the compiled model agree; a disagreement falls back),
without Spark."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from batch.retrain import (
    decide,
    empties,
    feature_gate,
    input_columns,
    parse_period,
    period_bounds,
    period_name,
    prediction_gates,
)
from batch.score import CHECK_ROWS, compiled_available, equal, predict_batches
from core.errors import UsageError
from examples.delivery.features import delivery_eta
from models.errors import ModelRegistryError
from models.fit import fit, model_features
from models.registry import CandidateResult, GateResult, ModelRegistry, RetrainDecision
from tests.helpers.serving import synthetic_training_set

PASS = [GateResult(name="finite", passed=True)]


def candidate(mae: float | None, gates: list[GateResult] = PASS, note: str = "") -> CandidateResult:
    return CandidateResult(version=1, mae=mae, gates=gates, note=note)


def test_a_better_challenger_is_promoted_only_by_the_margin() -> None:
    promote, reason, improvement = decide(candidate(100.0), candidate(97.0), margin=0.02)
    assert promote
    assert improvement == pytest.approx(0.03)
    assert "better by at least the margin 2.00%" in reason
    promote, reason, improvement = decide(candidate(100.0), candidate(99.0), margin=0.02)
    assert not promote
    assert improvement == pytest.approx(0.01)
    assert "not better by the margin" in reason
    # Equal MAE is not better, even with no margin; a worse one never is.
    assert not decide(candidate(100.0), candidate(100.0), margin=0.0)[0]
    assert not decide(candidate(100.0), candidate(120.0), margin=0.0)[0]


def test_a_challenger_failing_a_gate_is_refused_whatever_its_error() -> None:
    broken = [GateResult(name="not_constant", passed=False, detail="every prediction is 5")]
    promote, reason, improvement = decide(candidate(100.0), candidate(1.0, broken), margin=0.02)
    assert not promote
    assert improvement is None
    assert reason == "challenger fails its gates: not_constant (every prediction is 5)"
    assert not decide(None, candidate(1.0, broken), margin=0.0)[0]


def test_without_a_champion_to_beat_a_sane_challenger_is_promoted() -> None:
    assert decide(None, candidate(50.0), 0.02)[:2] == (True, "no production version")
    promote, reason, _ = decide(candidate(None, note="reads 'v:gone'"), candidate(50.0), 0.02)
    assert promote
    assert reason == "the champion cannot be evaluated: reads 'v:gone'"
    nan_champion = [GateResult(name="finite", passed=False, detail="3 of 9 not finite")]
    promote, reason, _ = decide(candidate(10.0, nan_champion), candidate(50.0), 0.02)
    assert promote
    assert reason.startswith("the champion fails its gates: finite")
    # A perfect champion can only be matched, never beaten.
    assert not decide(candidate(0.0), candidate(0.0), 0.0)[0]
    assert decide(candidate(0.0), candidate(1.0), 0.0)[2] == -math.inf


def test_prediction_gates() -> None:
    labels = (100.0, 200.0)  # widened by its width each side: [0, 300]
    sane = prediction_gates(np.array([90.0, 150.0, 290.0]), labels)
    assert [(g.name, g.passed) for g in sane] == [
        ("finite", True),
        ("in_range", True),
        ("not_constant", True),
    ]
    bad = {g.name: g for g in prediction_gates(np.array([np.nan, 150.0, 301.0, np.inf]), labels)}
    assert not bad["finite"].passed
    assert bad["finite"].detail == "2 of 4 not finite"
    assert not bad["in_range"].passed
    assert bad["in_range"].detail == "1 outside [0, 300]"
    assert bad["not_constant"].passed
    flat = {g.name: g for g in prediction_gates(np.full(5, 120.0), labels)}
    assert not flat["not_constant"].passed
    # Constant labels make constant predictions right.
    assert all(g.passed for g in prediction_gates(np.full(5, 7.0), (7.0, 7.0)))


def test_feature_gate_names_inputs_without_any_value() -> None:
    refs = [ref for ref, _ in model_features(delivery_eta)]
    columns = dict(model_features(delivery_eta))
    frame = pd.DataFrame({column: [1.0, 2.0] for column in columns.values()})
    assert feature_gate(frame, columns, empties(refs, delivery_eta)).passed
    # A view without rows reads as empty values: counts 0, means null.
    frame["restaurant_prep__count_30d"] = 0
    frame["restaurant_prep__mean_prep_seconds_30d"] = np.nan
    frame["distance_km"] = [np.nan, 3.0]  # one value is enough
    gate = feature_gate(frame, columns, empties(refs, delivery_eta))
    assert not gate.passed
    assert gate.detail == (
        "no value in any row: restaurant_prep:mean_prep_seconds_30d, restaurant_prep:count_30d"
    )


def test_periods() -> None:
    assert parse_period("7d") == 7 * 86_400_000
    assert parse_period("90m") == 5_400_000
    assert parse_period("2W") == 14 * 86_400_000
    for bad in ("", "d", "0h", "1.5d", "7y", "-1d"):
        with pytest.raises(UsageError, match="--period"):
            parse_period(bad)
    newest = int(datetime(2026, 11, 10, 14, 37, tzinfo=UTC).timestamp() * 1000)
    bounds = period_bounds(newest, 86_400_000)
    assert period_name(bounds) == "20261109T150000Z_20261110T150000Z"
    # A label exactly on the hour still lies inside: the end is exclusive.
    on_hour = int(datetime(2026, 11, 10, 15, tzinfo=UTC).timestamp() * 1000)
    assert period_bounds(on_hour, 3_600_000)[1] > on_hour
    assert period_bounds(newest, 3_600_000, until_ms=on_hour) == (on_hour - 3_600_000, on_hour)


def test_input_columns_follow_the_models_order_and_name_what_is_gone() -> None:
    refs = ["order_request:items", "zone_couriers:mean_speed_kmh_5m"]
    assert input_columns(refs, delivery_eta) == ["items", "zone_couriers__mean_speed_kmh_5m"]
    assert input_columns(["zone_couriers:gone"], delivery_eta) == (
        "reads 'zone_couriers:gone', which service 'delivery_eta' no longer provides"
    )


def decision(period: str, outcome: str = "promoted") -> RetrainDecision:
    return RetrainDecision(
        model="delivery_eta",
        period=period,
        period_ms=(0, 1),
        outcome=outcome,
        reason="no production version",
        margin=0.02,
        improvement=None,
        champion=None,
        challenger=candidate(10.0),
        rows_train=10,
        rows_eval=2,
        eval_window_ms=(0, 1),
        warm_start=False,
    )


def test_decisions_log_round_trips_and_replaces_a_forced_decision(tmp_path) -> None:
    registry = ModelRegistry(str(tmp_path))
    assert registry.decision("delivery_eta", "20261109T150000Z_20261110T150000Z") is None
    assert registry.decisions("delivery_eta") == []
    registry.record_decision(decision("20261109T150000Z_20261110T150000Z"))
    registry.record_decision(decision("20261108T150000Z_20261109T150000Z", "refused"))
    registry.record_decision(decision("20261109T150000Z_20261110T150000Z", "refused"))
    found = registry.decision("delivery_eta", "20261109T150000Z_20261110T150000Z")
    assert found is not None
    assert found.outcome == "refused"
    assert [d.period for d in registry.decisions("delivery_eta")] == [
        "20261108T150000Z_20261109T150000Z",
        "20261109T150000Z_20261110T150000Z",
    ]
    assert not list((tmp_path / "delivery_eta" / "decisions").glob("*.tmp"))
    with pytest.raises(ModelRegistryError, match="period name"):
        registry.decision("delivery_eta", "../escape")


@pytest.fixture(scope="module")
def small_model() -> tuple[str, list[str], pd.DataFrame]:
    frame = synthetic_training_set(delivery_eta, n=400, seed=3)
    trained = fit(frame, delivery_eta, label="delivery_seconds", rounds=15)
    return trained.model_text, [c for _, c in model_features(delivery_eta)], frame


def run_batches(
    model_text: str, columns: list[str], frame: pd.DataFrame, kind: str
) -> tuple[pd.DataFrame, list[tuple[int, bool]]]:
    seen: list[tuple[int, bool]] = []
    batches = [frame.iloc[:150], frame.iloc[150:]]
    run = predict_batches(lambda: model_text, columns, kind, lambda n, m: seen.append((n, m)))
    return pd.concat(list(run(iter(batches)))), seen


def test_batches_get_lightgbms_predictions(small_model) -> None:
    import lightgbm as lgb

    text, columns, frame = small_model
    out, seen = run_batches(text, columns, frame, "native")
    expected = lgb.Booster(model_str=text).predict(frame[columns].astype("float64").to_numpy())
    assert np.array_equal(out["prediction"].to_numpy(), expected)
    assert set(out["predictor"]) == {"lightgbm"}
    assert seen == [(150, False), (250, False)]
    assert list(out.columns) == [*frame.columns, "prediction", "predictor"]


@pytest.mark.skipif(not compiled_available(), reason="lleaves is not installed")
def test_the_compiled_model_predicts_what_lightgbm_does(small_model, monkeypatch) -> None:
    import batch.score

    text, columns, frame = small_model
    native, _ = run_batches(text, columns, frame, "native")
    compiled, seen = run_batches(text, columns, frame, "compiled")
    assert set(compiled["predictor"]) == {"lleaves"}
    assert seen == [(150, False), (250, False)]
    assert equal(compiled["prediction"].to_numpy(), native["prediction"].to_numpy())
    # A compiled model that disagrees is caught on the task's first batch and replaced.
    monkeypatch.setattr(batch.score, "equal", lambda got, expected: False)
    fallen, seen = run_batches(text, columns, frame, "compiled")
    assert seen[0] == (150, True)
    assert set(fallen["predictor"]) == {"lightgbm"}
    assert np.array_equal(fallen["prediction"].to_numpy(), native["prediction"].to_numpy())
    assert CHECK_ROWS <= 1024


def test_equal_is_relative() -> None:
    assert equal(np.array([1000.0, np.nan]), np.array([1000.0 * (1 + 5e-10), np.nan]))
    assert not equal(np.array([1000.0]), np.array([1000.0 * (1 + 5e-9)]))
    assert equal(np.array([0.0]), np.array([1e-13]))
