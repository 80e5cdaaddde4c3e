"""Exp4 ensembles through the app: every version predicts, a slow one is cut at the straggler
deadline and named, too few answers fall back to production (fake store and producer)."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from core.records import PredictionRecord
from core.settings import load_settings
from examples.delivery.features import (
    delivery_eta,
    restaurant_orders,
    restaurant_prep,
    zone_couriers,
)
from features.contract import window_end_at
from models.registry import ModelRegistry
from serving.app import create_app
from serving.model import LoadedModel
from serving.policy_state import MemoryPolicyStore, state_key
from tests.helpers.serving import FakeProducer, FakeReader, random_row, trained_registry

SLOW_S = 1.5


class SlowBooster:
    """A booster that answers like the real one, ``delay_s`` late."""

    def __init__(self, booster: Any, delay_s: float) -> None:
        self.booster = booster
        self.delay_s = delay_s

    def predict(self, matrix: Any, num_threads: int = 1) -> Any:
        time.sleep(self.delay_s)
        return self.booster.predict(matrix, num_threads=num_threads)


def reader() -> FakeReader:
    fake = FakeReader()
    rng = random.Random(5)
    for view in (restaurant_orders, zone_couriers, restaurant_prep):
        keys = ["z1"] if view is zone_couriers else ["r001"]
        for key in keys:
            fake.put(view, key, window_end_at(view, int(time.time() * 1000)), random_row(view, rng))
    return fake


ROW = {"restaurant_id": "r001", "zone_id": "z1", "distance_km": 2.0, "hour_of_day": 12, "items": 2}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ensemble") / "models"
    trained_registry(root, delivery_eta, versions=3)
    return root


def app_with_slow_arm(models: Path, producer: FakeProducer, store: MemoryPolicyStore, **over: Any):
    settings = load_settings(
        models_dir=str(models),
        serve_models=["delivery_eta"],
        selection_policy="exp4",
        bandit_arms=3,
        ensemble_deadline_ms=100,
        **over,
    )
    registry = ModelRegistry(str(models))
    return create_app(
        settings, reader=reader(), registry=registry, producer=producer, policy_store=store
    )


def make_slow(app: Any, version: int) -> LoadedModel:
    slot = app.state.predictor.served["delivery_eta"].slot
    arm: LoadedModel = slot.state.arms[version]
    slow = LoadedModel(arm.metadata, SlowBooster(arm.booster, SLOW_S), arm.plan)
    others = {v: a for v, a in slot.state.arms.items() if v != slot.state.production.version}
    slot.swap(slot.state.production, others | {version: slow})
    return arm


def test_ensemble_answers_within_the_deadline_and_marks_the_straggler(models):
    producer, store = FakeProducer(), MemoryPolicyStore()
    # Weights learnt so far (shared state): v2 counts e^1 times as much as v1, v3 a third.
    store.apply(
        state_key("delivery_eta", "exp4", ""), {}, {"lw:1": -1.0, "lw:2": 0.0, "lw:3": -2.0}
    )
    app = app_with_slow_arm(models, producer, store)
    with TestClient(app) as client:
        app.state.predictor.bandit.state.refresh()
        real = make_slow(app, 3)
        started = time.perf_counter()
        answer = client.post("/predict", json={"rows": [ROW]})
        elapsed = time.perf_counter() - started
        assert answer.status_code == 200, answer.text
        (row,) = answer.json()["predictions"]
        ensemble = row["ensemble"]
        print(f"ensemble answer in {elapsed * 1000:.0f} ms, deadline 100 ms, straggler {SLOW_S} s")
        assert elapsed < SLOW_S / 2  # honest bound under load: far below the slow model's time
        assert (ensemble["used"], ensemble["missing"], ensemble["fallback"]) == ([1, 2], [3], False)
        preds = {int(v): p for v, p in ensemble["predictions"].items()}
        w1, w2 = np.exp(-1.0), 1.0
        assert row["prediction"] == pytest.approx((w1 * preds[1] + w2 * preds[2]) / (w1 + w2))
        assert row["model_version"] == 1  # production carries the row
        # The straggler is still busy: the next batch names it missing without waiting for it.
        again = client.post("/predict", json={"rows": [ROW, ROW]}).json()["predictions"]
        assert all(p["ensemble"]["missing"] == [3] for p in again)
        matrix = np.zeros((1, len(real.plan.inputs)))
        assert real.predict(matrix).shape == (1,)
        metrics = client.get("/metrics").text
        assert 'sluice_ensemble_missing_total{model="delivery_eta",version="3"} 3.0' in metrics
    logged = [
        PredictionRecord.decode(m.value())
        for m in producer.delivered
        if m.topic() == app.state.predictor.settings.prediction_topic
    ]
    assert len(logged) == 3
    assert all(r.ensemble is not None and r.ensemble["missing"] == [3] for r in logged)


def test_too_few_answers_fall_back_to_the_production_version(models):
    producer, store = FakeProducer(), MemoryPolicyStore()
    app = app_with_slow_arm(models, producer, store, ensemble_min_models=3)
    with TestClient(app) as client:
        make_slow(app, 2)
        (row,) = client.post("/predict", json={"rows": [ROW]}).json()["predictions"]
        ensemble = row["ensemble"]
        assert ensemble["fallback"] is True
        assert ensemble["missing"] == [2]
        assert row["prediction"] == pytest.approx(ensemble["predictions"]["1"])
