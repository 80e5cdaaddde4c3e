"""`sluice train` end to end on a small simulated history: produce -> Spark backfill -> point-in-
time training sets -> LightGBM -> model registry -> the predictor serves the trained model."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from batch.train import build_labels, train_models, view_gains
from core.settings import Settings
from feature_repo import registry_ops
from features.registry import load_registry
from models.registry import ModelRegistry
from serving.app import create_app
from tests.helpers.spark import isolated_settings, simulated_history

pytestmark = [pytest.mark.integration, pytest.mark.spark, pytest.mark.slow]
START = datetime(2026, 11, 10, 11, tzinfo=UTC)  # the lunch rush: many orders


@pytest.fixture(scope="module")
def settings(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    tmp: Path = tmp_path_factory.mktemp("train")
    return isolated_settings(
        stack_settings, tmp, "train_test", serve_models=["delivery_eta", "delivery_eta_batch_only"]
    )


def test_train_stores_evaluated_models_that_the_predictor_serves(spark, settings):
    registry = load_registry(settings.definitions_module)
    registry_ops.apply(settings, registry)
    simulated_history(spark, settings, 20_000, START, materialize=True)
    rows = build_labels(settings, registry, registry.labels["delivery_times"])
    labels = rows.frame
    assert len(labels) > 300
    assert rows.dropped == {"orders by order_id": 0}
    assert labels["hour_of_day"].between(0, 23).all()

    # No service named: every service of the example's label declaration.
    trained = train_models(settings, eval_fraction=0.25, rounds=50)
    by_name = {m.metadata.name: m for m in trained.models}
    assert set(by_name) == {"delivery_eta", "delivery_eta_batch_only"}
    for model in trained.models:
        meta = model.metadata
        assert model.promoted
        assert meta.version == 1
        assert meta.metrics.rows_train + meta.metrics.rows_eval == len(labels)
        assert meta.train_window_ms[1] <= meta.eval_window_ms[0]
        assert meta.metrics.mae < meta.metrics.mae_mean_baseline
    # The streaming views had data at label times; the 30-day daily view has none within the
    # history's first day, which is what a training set must say (closed windows only).
    assert by_name["delivery_eta"].rows_with_features > 0.5 * len(labels)
    assert by_name["delivery_eta_batch_only"].rows_with_features == 0
    # Both saw the same labels and the same evaluation slice: their MAEs compare.
    eta, batch_only = by_name["delivery_eta"].metadata, by_name["delivery_eta_batch_only"].metadata
    assert eta.eval_window_ms == batch_only.eval_window_ms
    assert eta.label == "delivery_seconds"
    assert [line.split(" cuts")[0] for line in view_gains(trained)] == ["delivery_eta"]

    models = ModelRegistry(settings.models_dir)
    assert models.production("delivery_eta") == 1
    again = train_models(settings, ["delivery_eta"], eval_fraction=0.25, rounds=50)
    assert again.models[0].metadata.version == 2
    assert not again.models[0].promoted

    row = labels.iloc[-1]
    request = {
        "restaurant_id": row["restaurant_id"],
        "zone_id": row["zone_id"],
        "distance_km": float(row["distance_km"]),
        "hour_of_day": int(row["hour_of_day"]),
        "items": int(row["items"]),
    }
    with TestClient(create_app(settings)) as client:
        answer = client.post("/predict", json={"rows": [request]})
        assert answer.status_code == 200, answer.text
        prediction = answer.json()["predictions"][0]
        assert prediction["model_version"] == 1
        assert "restaurant_prep" not in prediction["missing"]  # materialized by the backfill
