"""The predictor against real Redis, Kafka and Feast: served features equal Feast's
get_online_features, predictions equal LightGBM's own predict on those rows, the row the
availability contract picks (newest or previous) is served, and every prediction and feedback
record arrives in its topic."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from core.kafka import read_topics
from core.records import FeedbackRecord, PredictionRecord
from core.settings import Settings
from examples.delivery.features import (
    delivery_eta,
    delivery_eta_batch_only,
    restaurant_orders,
    restaurant_prep,
    zone_couriers,
)
from feature_repo.config import feature_store
from feature_repo.online_store import OnlineRow
from features.contract import window_end_at
from features.definitions import FeatureView, empty_value
from models.registry import ModelRegistry
from serving.app import create_app
from tests.helpers.feast import feast_settings
from tests.helpers.serving import random_row, trained_registry
from tests.helpers.stream import patient_store

pytestmark = pytest.mark.integration
VIEWS = (restaurant_orders, zone_couriers, restaurant_prep)


def servable_end(view: FeatureView, back: int) -> int:
    """A window end ``back`` slides before the one due now: servable for the whole test."""
    return window_end_at(view, int(time.time() * 1000)) - back * view.slide_ms


RESTAURANTS = [f"r{i:03d}" for i in range(20)]
ZONES = [f"z{i}" for i in range(5)]


@pytest.fixture(scope="module")
def settings(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    tmp: Path = tmp_path_factory.mktemp("serving")
    run = uuid.uuid4().hex[:8]
    settings = feast_settings(
        stack_settings,
        tmp,
        "serving_test",
        models_dir=str(tmp / "models"),
        serve_models=["delivery_eta", "delivery_eta_batch_only"],
        prediction_topic=f"test.predictions.{run}",
        feedback_topic=f"test.feedback.{run}",
    )
    rng = random.Random(11)
    with patient_store(settings) as online:
        for view in VIEWS:
            keys = ZONES if view is zone_couriers else RESTAURANTS
            # Every fifth entity has no row: served with defaults, null through Feast. Rows are
            # servable and behind the contract (older than the window due now): served as they
            # are, flagged, so their values are Feast's.
            rows = [
                OnlineRow(key, servable_end(view, 1 + rng.randrange(3)), random_row(view, rng))
                for i, key in enumerate(keys)
                if i % 5 != 4
            ]
            online.write(view, rows)
    return settings


@pytest.fixture(scope="module")
def models(settings: Settings) -> ModelRegistry:
    registry = trained_registry(Path(settings.models_dir), delivery_eta)
    trained_registry(Path(settings.models_dir), delivery_eta_batch_only)
    return registry


@pytest.fixture(scope="module")
def client(settings: Settings, models: ModelRegistry) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def request_rows(n: int) -> list[dict[str, Any]]:
    return [
        {
            "restaurant_id": RESTAURANTS[i % len(RESTAURANTS)],
            "zone_id": ZONES[(i * 3) % len(ZONES)],
            "distance_km": 0.5 + (i % 9),
            "hour_of_day": i % 24,
            "items": 1 + i % 5,
        }
        for i in range(n)
    ]


def feast_values(settings: Settings, rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    refs = [f"{v.name}:{s.name}" for v in VIEWS for s in v.features()]
    entity_rows = [{"restaurant_id": r["restaurant_id"], "zone_id": r["zone_id"]} for r in rows]
    got: dict[str, list[Any]] = (
        feature_store(settings)
        .get_online_features(features=refs, entity_rows=entity_rows)
        .to_dict()
    )
    return got


def view_of(ref: str) -> FeatureView:
    return {v.name: v for v in VIEWS}[ref.partition(":")[0]]


def test_served_feature_values_equal_feasts(client, settings):
    rows = request_rows(40)
    answer = client.post("/predict", json={"rows": rows, "return_features": True})
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    feast = feast_values(settings, rows)
    compared = defaulted = 0
    for i, (row, prediction) in enumerate(zip(rows, predictions, strict=True)):
        for ref, value in prediction["features"].items():
            group, _, name = ref.partition(":")
            if group == "order_request":
                assert value == row[name]
                continue
            from_feast = feast[name][i]
            if group in prediction["missing"]:  # no row: Feast says null, we the empty value
                assert from_feast is None
                spec = next(s for s in view_of(ref).features() if s.name == name)
                assert value == empty_value(spec.function)
                defaulted += 1
            else:
                assert value == from_feast, (ref, row)
                assert type(value) is type(from_feast)
                compared += 1
    assert compared > 300
    assert defaulted > 20
    for prediction in predictions:  # every stored row is older than the one due: flagged
        stored = {v for v, end in prediction["window_ends_ms"].items() if end is not None}
        assert set(prediction["behind"]) == stored


def test_the_row_due_at_t_is_served_newest_or_previous(client, settings):
    """The stream wrote E + 1 min before it was servable: until E + 1 min + lateness the
    predictor serves E's row (the previous slot), Feast's own read the newest."""
    e0 = window_end_at(restaurant_orders, int(time.time() * 1000)) - 10 * 60_000
    e1 = e0 + 60_000
    rng = random.Random(12)
    older, newer = random_row(restaurant_orders, rng), random_row(restaurant_orders, rng)
    older["count_5m"], newer["count_5m"] = 3, 7
    with patient_store(settings) as online:
        online.write(restaurant_orders, [OnlineRow("r-contract", e0, older)])
        online.write(restaurant_orders, [OnlineRow("r-contract", e1, newer)])
    row = request_rows(1)[0] | {"restaurant_id": "r-contract"}
    lateness = int(restaurant_orders.lateness.total_seconds() * 1000)

    def served_at(t_ms: int | None) -> dict[str, Any]:
        body = row if t_ms is None else row | {"event_time": t_ms}
        answer = client.post("/predict", json={"rows": [body], "return_features": True})
        assert answer.status_code == 200, answer.text
        got: dict[str, Any] = answer.json()["predictions"][0]
        return got

    before = served_at(e1 + lateness - 1)
    assert before["window_ends_ms"]["restaurant_orders"] == e0
    assert before["features"]["restaurant_orders:count_5m"] == 3
    assert "restaurant_orders" not in before["behind"]
    at = served_at(e1 + lateness)
    assert at["window_ends_ms"]["restaurant_orders"] == e1
    assert at["features"]["restaurant_orders:count_5m"] == 7
    now = served_at(None)  # nine minutes on, E(t) has no row: behind, the newest served
    assert "restaurant_orders" in now["behind"]
    assert now["features"]["restaurant_orders:count_5m"] == 7
    feast = feast_values(settings, [row])
    assert feast["count_5m"] == [7]  # Feast's reads keep seeing the newest row


def test_predictions_equal_lightgbm_predict_on_the_same_rows(client, settings, models):
    rows = request_rows(60)
    predictions = client.post("/predict", json={"rows": rows}).json()["predictions"]
    meta = models.metadata("delivery_eta", 1)
    feast = feast_values(settings, rows)
    matrix = []
    for i, row in enumerate(rows):
        vector = []
        for ref in meta.features:
            group, _, name = ref.partition(":")
            if group == "order_request":
                vector.append(float(row[name]))
                continue
            value = feast[name][i]
            if value is None and predictions[i]["window_ends_ms"][group] is None:
                spec = next(s for s in view_of(ref).features() if s.name == name)
                value = empty_value(spec.function)  # the documented default for a missing row
            vector.append(np.nan if value is None else float(value))
        matrix.append(vector)
    booster = _booster(models.model_text("delivery_eta", 1))
    expected = booster.predict(np.array(matrix, dtype=np.float64))
    got = np.array([p["prediction"] for p in predictions])
    np.testing.assert_array_equal(got, expected)


def test_every_prediction_and_feedback_arrives_in_its_topic(settings, models):
    run = uuid.uuid4().hex[:8]  # topics of this test alone, so counts are exact
    settings = settings.model_copy(
        update={
            "prediction_topic": f"test.p.{run}",
            "feedback_topic": f"test.f.{run}",
            # Its own write-ahead log: the module's client holds the shared one.
            "prediction_log_dir": settings.state_dir / f"prediction-log-{run}",
        }
    )
    app = create_app(settings)
    ids: list[str] = []
    with TestClient(app) as client:
        for start in range(0, 50, 10):
            answer = client.post("/predict", json={"rows": request_rows(50)[start : start + 10]})
            ids += [p["prediction_id"] for p in answer.json()["predictions"]]
        for prediction_id in ids[:5]:
            fed = client.post("/feedback", json={"prediction_id": prediction_id, "label": 700.0})
            assert fed.json()["matched"] is True
        prediction_log = app.state.predictor.log
    # Leaving the client closed the app, which drains and flushes the log (counts: a snapshot
    # when read, so read after the close).
    counts = prediction_log.counts
    assert (counts.delivered, counts.failed, counts.dropped, counts.pending) == (55, 0, 0, 0)
    logged = [
        PredictionRecord.decode(m.value())
        for m in read_topics(settings, [settings.prediction_topic])
    ]
    assert sorted(r.prediction_id for r in logged) == sorted(ids)
    record = logged[0]
    assert record.v == PredictionRecord.VERSION
    assert set(record.features) == set(delivery_eta.feature_refs())
    assert record.model_version == 1
    assert record.propensity == 1.0  # one version served: chosen with certainty
    assert record.latency_ms > 0
    assert set(record.feature_ages_ms) == {v.name for v in VIEWS}
    assert record.window_ends_ms is not None
    assert set(record.window_ends_ms) == {v.name for v in VIEWS}
    assert record.row_status is not None
    assert set(record.row_status.values()) <= {"exact", "behind", "missing"}
    assert record.as_of_ms is not None
    assert record.as_of_ms <= record.time_ms
    feedback = [
        FeedbackRecord.decode(m.value()) for m in read_topics(settings, [settings.feedback_topic])
    ]
    assert sorted(f.prediction_id for f in feedback) == sorted(ids[:5])
    assert all(f.label == 700.0 and f.matched for f in feedback)


def _booster(model_str: str) -> Any:
    import lightgbm as lgb

    return lgb.Booster(model_str=model_str)
