"""Model registry round trips and the pure LightGBM training step."""

from __future__ import annotations

import json

import numpy as np
import pytest

from examples.delivery.features import delivery_eta, delivery_eta_batch_only
from models.errors import ModelNotFoundError, ModelRegistryError, TrainingDataError
from models.fit import fit, model_features, time_split, to_matrix
from models.registry import METADATA_FILE, ModelRegistry
from serving.model import model_from_text
from tests.helpers.serving import synthetic_training_set


def test_model_features_follow_the_service_order_and_training_columns():
    features = model_features(delivery_eta)
    assert [ref for ref, _ in features] == list(delivery_eta.feature_refs())
    # Column names are batch.training's convention ("<view>__<feature>"); request features
    # are label columns named after their field.
    assert features[0] == ("restaurant_orders:count_5m", "restaurant_orders__count_5m")
    assert features[-3:] == [
        ("order_request:distance_km", "distance_km"),
        ("order_request:hour_of_day", "hour_of_day"),
        ("order_request:items", "items"),
    ]


def test_fit_evaluates_on_the_later_slice_and_beats_the_mean():
    frame = synthetic_training_set(delivery_eta, n=800)
    trained = fit(frame, delivery_eta, label="delivery_seconds", eval_fraction=0.25)
    meta = trained.metadata
    assert meta.train_window_ms[1] <= meta.eval_window_ms[0]  # eval strictly later
    assert meta.metrics.rows_train + meta.metrics.rows_eval == 800
    assert meta.metrics.mae < 0.6 * meta.metrics.mae_mean_baseline
    assert meta.features == list(delivery_eta.feature_refs())
    assert {"lightgbm", "numpy", "pandas", "python"} <= set(meta.library_versions)
    # The stored text predicts what was evaluated.
    model = model_from_text(trained.model_text, meta, {"delivery_eta": delivery_eta})
    _, test = time_split(frame, 0.25)
    columns = [c for _, c in model_features(delivery_eta)]
    np.testing.assert_allclose(model.predict(to_matrix(test, columns)), trained.eval_predictions)


def test_time_split_never_puts_one_instant_in_both_slices():
    frame = synthetic_training_set(delivery_eta_batch_only, n=100)
    frame["event_timestamp"] = frame["event_timestamp"] // 86_400_000  # many ties
    train, test = time_split(frame, 0.3)
    assert train["event_timestamp"].max() < test["event_timestamp"].min()


def test_too_few_labels_is_a_clear_error():
    frame = synthetic_training_set(delivery_eta, n=5)
    with pytest.raises(TrainingDataError, match="5 labelled rows"):
        fit(frame, delivery_eta, label="delivery_seconds")
    with pytest.raises(TrainingDataError, match="label column 'nope'"):
        fit(synthetic_training_set(delivery_eta), delivery_eta, label="nope")


def test_registry_round_trip_versions_and_production(tmp_path):
    registry = ModelRegistry(str(tmp_path / "models"))
    assert registry.models() == []
    trained = fit(synthetic_training_set(delivery_eta), delivery_eta, label="delivery_seconds")
    first = registry.save(trained.model_text, trained.metadata)
    second = registry.save(trained.model_text, trained.metadata)
    assert (first.version, second.version) == (1, 2)
    assert registry.versions("delivery_eta") == [1, 2]
    assert registry.production("delivery_eta") is None
    registry.promote("delivery_eta", 2)
    assert registry.production("delivery_eta") == 2
    assert registry.metadata("delivery_eta", 1) == first
    assert registry.model_text("delivery_eta", 1) == trained.model_text
    described = registry.describe()
    assert [v["production"] for v in described[0]["versions"]] == [False, True]
    on_disk = json.loads((tmp_path / "models/delivery_eta/1" / METADATA_FILE).read_text())
    assert on_disk["feature_service"] == "delivery_eta"
    assert on_disk["features"] == list(delivery_eta.feature_refs())


def test_incomplete_versions_are_invisible_and_bad_names_refused(tmp_path):
    registry = ModelRegistry(str(tmp_path))
    (tmp_path / "delivery_eta" / "1").mkdir(parents=True)
    (tmp_path / "delivery_eta" / "1" / "model.txt").write_text("half written")
    assert registry.versions("delivery_eta") == []
    with pytest.raises(ModelNotFoundError, match="no version 1"):
        registry.promote("delivery_eta", 1)
    with pytest.raises(ModelNotFoundError, match="not a model name"):
        registry.versions("../etc")
    (tmp_path / "delivery_eta" / "production").write_text("latest")
    with pytest.raises(ModelRegistryError, match="pointer 'latest'"):
        registry.production("delivery_eta")


def test_object_store_uris_go_through_pyarrow(tmp_path):
    registry = ModelRegistry(f"file://{tmp_path}/store")
    trained = fit(
        synthetic_training_set(delivery_eta_batch_only),
        delivery_eta_batch_only,
        label="delivery_seconds",
        rounds=5,
    )
    registry.save(trained.model_text, trained.metadata)
    assert registry.versions("delivery_eta_batch_only") == [1]
    with pytest.raises(ModelRegistryError, match="nosuch://"):
        ModelRegistry("nosuch://bucket/models")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"prediction_topic": "bad topic!"}, "prediction_topic: .*not a Kafka topic name"),
        ({"latency_objective_ms": 0}, "latency_objective_ms: .*greater than 0"),
        ({"batch_backoff": 1.5}, "batch_backoff: .*less than 1"),
        ({"serve_models": []}, "serve_models: .*at least one model"),
        ({"models_dir": "ftp://host/models"}, "models_dir: .*scheme 'ftp'"),
    ],
)
def test_serving_settings_are_validated_with_the_field_named(override, message):
    from core.errors import SettingsError
    from core.settings import load_settings

    with pytest.raises(SettingsError, match=message):
        load_settings(**override)
