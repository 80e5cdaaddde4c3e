"""The predictor app with a fake online store and a fake Kafka producer (no servers)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from core.settings import Settings, load_settings
from examples.delivery.features import (
    delivery_eta,
    delivery_eta_batch_only,
    restaurant_orders,
    restaurant_prep,
    zone_couriers,
)
from feature_repo.errors import OnlineStoreError
from features.contract import window_end_at
from features.definitions import FeatureView
from models.registry import ModelRegistry
from serving.app import create_app
from tests.helpers.serving import (
    ADMIN,
    ADMIN_TOKEN,
    FakeProducer,
    FakeReader,
    random_row,
    trained_registry,
)

VIEWS = (restaurant_orders, zone_couriers, restaurant_prep)


def due_end(view: FeatureView) -> int:
    """The window end the availability contract serves now (features/contract.py)."""
    return window_end_at(view, int(time.time() * 1000))


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    registry = trained_registry(tmp_path / "models", delivery_eta, versions=2)
    trained_registry(tmp_path / "models", delivery_eta_batch_only)
    return registry


@pytest.fixture
def reader() -> FakeReader:
    reader = FakeReader()
    rng = random.Random(3)
    for view in VIEWS:
        keys = (
            [f"z{i}" for i in range(5)]
            if view is zone_couriers
            else [f"r{i:03d}" for i in range(10)]
        )
        for key in keys:
            reader.put(view, key, due_end(view), random_row(view, rng))
    return reader


@pytest.fixture
def producer() -> FakeProducer:
    return FakeProducer()


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    return load_settings(
        models_dir=str(tmp_path / "models"),
        serve_models=["delivery_eta", "delivery_eta_batch_only"],
        admin_tokens=[ADMIN_TOKEN],
        **overrides,
    )


@pytest.fixture
def client(tmp_path, registry, reader, producer) -> Iterator[TestClient]:
    app = create_app(settings_for(tmp_path), reader=reader, registry=registry, producer=producer)
    with TestClient(app) as client:
        yield client


def row(i: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "restaurant_id": f"r{i % 10:03d}",
        "zone_id": f"z{i % 5}",
        "distance_km": 1.5 + i,
        "hour_of_day": i % 24,
        "items": 1 + i % 4,
    } | extra


def expected_vector(
    reader: FakeReader, refs: list[str], request_row: dict[str, Any]
) -> list[float]:
    views: dict[str, FeatureView] = {v.name: v for v in VIEWS}
    out = []
    for ref in refs:
        group, _, name = ref.partition(":")
        if group == "order_request":
            out.append(float(request_row[name]))
            continue
        view = views[group]
        stored = reader.rows[(group, request_row[view.entity.join_key])]
        value = stored.values[name]
        out.append(np.nan if value is None else float(value))
    return out


def test_predictions_equal_lightgbm_on_the_same_rows(client, registry, reader):
    rows = [row(i) for i in range(12)]
    answer = client.post("/predict", json={"rows": rows, "return_features": True})
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    meta = registry.metadata("delivery_eta", 1)
    booster = _booster(registry.model_text("delivery_eta", 1))
    matrix = np.array([expected_vector(reader, meta.features, r) for r in rows])
    np.testing.assert_allclose([p["prediction"] for p in predictions], booster.predict(matrix))
    assert len({p["prediction_id"] for p in predictions}) == 12
    first = predictions[0]
    assert (first["model"], first["model_version"]) == ("delivery_eta", 1)
    assert list(first["features"]) == meta.features  # the model's order
    assert set(first["feature_ages_ms"]) == {v.name for v in VIEWS}
    for view in VIEWS:  # the row due now was served: its end, now minus its end as the age
        end = reader.rows[
            (view.name, rows[0]["zone_id" if view is zone_couriers else "restaurant_id"])
        ].window_end_ms
        assert first["window_ends_ms"][view.name] == end
        assert 0 <= (time.time() * 1000 - end) - first["feature_ages_ms"][view.name] < 10_000
    # A minute may turn between writing the rows and reading them: then a view is behind.
    assert set(first["behind"]) <= {v.name for v in VIEWS}
    assert not {v.name for v in VIEWS} & set(first["missing"])  # null values may be listed
    assert first["stale"] == []
    assert (
        "features" not in client.post("/predict", json={"rows": rows[:1]}).json()["predictions"][0]
    )


def test_missing_rows_use_documented_defaults_and_say_so(client, registry, reader):
    unknown = row(0, restaurant_id="never-seen")
    answer = client.post("/predict", json={"rows": [unknown], "return_features": True}).json()
    got = answer["predictions"][0]
    assert got["feature_ages_ms"]["restaurant_orders"] is None
    assert got["feature_ages_ms"]["zone_couriers"] is not None
    assert {"restaurant_orders", "restaurant_prep"} <= set(got["missing"])
    features = got["features"]
    assert features["restaurant_orders:count_5m"] == 0  # count of an empty window
    assert features["restaurant_orders:sum_items_15m"] == 0.0  # sum of an empty window
    assert features["restaurant_orders:mean_subtotal_1h"] is None  # mean: null -> NaN
    meta = registry.metadata("delivery_eta", 1)
    vector = [np.nan if features[r] is None else float(features[r]) for r in meta.features]
    booster = _booster(registry.model_text("delivery_eta", 1))
    assert got["prediction"] == pytest.approx(booster.predict(np.array([vector]))[0])


def test_each_batch_reads_all_views_in_one_round_trip(client, reader):
    # A first request warms the model and the worker thread up: a cold first batch can miss
    # the latency objective on a loaded machine and make AIMD back off to 1.
    client.post("/predict", json={"rows": [row(i) for i in range(40)]})
    reader.calls.clear()
    client.post("/predict", json={"rows": [row(i) for i in range(40)]})
    assert reader.calls  # every call covers every view the batch needs, keys deduplicated
    for call in reader.calls:
        assert sorted(name for name, _ in call) == sorted(v.name for v in VIEWS)
        assert all(n <= 10 for _, n in call)
    served = client.get("/models").json()["serving"]["delivery_eta"]
    assert served["batch_size"] > 1  # fast batches: AIMD grew the size


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"rows": [row(0, distance_km=120)]}, "rows[0].distance_km", "less than or equal to 100"),
        ({"rows": [row(0, hour_of_day="noon")]}, "rows[0].hour_of_day", "valid integer"),
        ({"rows": [row(0, items=0)]}, "rows[0].items", "greater than or equal to 1"),
        ({"rows": [row(0, colour="red")]}, "rows[0].colour", "Extra inputs"),
        (
            {"rows": [{k: v for k, v in row(0).items() if k != "zone_id"}]},
            "rows[0].zone_id",
            "required",
        ),
        ({"rows": [row(0), row(1, restaurant_id="")]}, "rows[1].restaurant_id", "at least 1"),
        ({"rows": []}, "rows", "at least 1 item"),
        ({"rowz": [row(0)]}, "rows", "required"),
    ],
)
def test_bad_requests_are_422_naming_the_field_and_reason(client, body, field, reason):
    answer = client.post("/predict", json=body)
    assert answer.status_code == 422
    problems = answer.json()["detail"]
    assert answer.json()["error"] == "invalid_request"
    assert any(p["field"] == field and reason in p["reason"] for p in problems), problems


def test_malformed_json_and_unknown_models(client):
    answer = client.post(
        "/predict", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["field"].startswith("body")
    answer = client.post("/predict", json={"model": "nope", "rows": [row()]})
    assert answer.status_code == 404
    assert answer.json()["error"] == "model_not_found"
    answer = client.post("/models/delivery_eta/versions/9:promote", headers=ADMIN)
    assert (answer.status_code, answer.json()["error"]) == (404, "model_not_found")


def test_feature_store_down_is_503_not_500(client, reader):
    reader.fail = OnlineStoreError("connection refused")
    answer = client.post("/predict", json={"rows": [row()]})
    assert answer.status_code == 503
    assert answer.json()["error"] == "feature_store_unavailable"


def test_batch_only_model_needs_only_its_entities(client):
    just_restaurant = {"restaurant_id": "r001", "distance_km": 2.0, "hour_of_day": 3, "items": 2}
    answer = client.post(
        "/predict", json={"model": "delivery_eta_batch_only", "rows": [just_restaurant]}
    )
    assert answer.status_code == 200, answer.text
    assert list(answer.json()["predictions"][0]["feature_ages_ms"]) == ["restaurant_prep"]


def test_every_prediction_and_feedback_is_logged(tmp_path, registry, reader, producer):
    app = create_app(settings_for(tmp_path), reader=reader, registry=registry, producer=producer)
    with TestClient(app) as client:
        predictions = client.post("/predict", json={"rows": [row(i) for i in range(7)]}).json()
        first = predictions["predictions"][0]
        fed = client.post(
            "/feedback", json={"prediction_id": first["prediction_id"], "label": 900.0}
        )
        assert fed.status_code == 202
        assert fed.json()["matched"] is True
        assert fed.json()["error"] == pytest.approx(900.0 - first["prediction"])
        unknown = client.post("/feedback", json={"prediction_id": "elsewhere", "label": 1.0}).json()
        assert unknown["matched"] is False
        bad = client.post("/feedback", json={"prediction_id": "x", "label": "late"})
        assert bad.status_code == 422
    # Leaving the client closes the app: the log is drained and flushed.
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for message in producer.delivered:
        by_topic.setdefault(message.topic(), []).append(orjson.loads(message.value()))
    logged = by_topic["sluice.predictions"]
    assert len(logged) == 7
    record = next(r for r in logged if r["prediction_id"] == first["prediction_id"])
    assert record["prediction"] == first["prediction"]
    assert record["model_version"] == 1
    assert set(record["features"]) == set(delivery_eta.feature_refs())
    assert record["latency_ms"] > 0
    assert record["feature_ages_ms"] == first["feature_ages_ms"]
    assert [r["prediction_id"] for r in by_topic["sluice.feedback"]] == [
        first["prediction_id"],
        "elsewhere",
    ]


def test_promote_swaps_models_without_failing_requests(tmp_path, registry, reader, producer):
    reader.delay_s = 0.002  # keep batches in flight while the swap happens
    sent_after: list[bool] = []
    app = create_app(settings_for(tmp_path), reader=reader, registry=registry, producer=producer)

    async def scenario() -> tuple[list[httpx.Response], httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        answers: list[httpx.Response] = []
        promoted_at: list[int] = []
        sent_after.clear()
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ):

            async def load(worker: int) -> None:
                # Keep requests flowing until well after the promote has answered.
                i = worker
                while not promoted_at or len(answers) < promoted_at[0] + 100:
                    after = bool(promoted_at)  # sent once the promote had answered
                    answer = await client.post("/predict", json={"rows": [row(i % 50)]})
                    sent_after.append(after)
                    answers.append(answer)
                    i += 8

            loaders = [asyncio.ensure_future(load(k)) for k in range(8)]
            while len(answers) < 50:
                await asyncio.sleep(0.005)
            promoted = await client.post("/models/delivery_eta/versions/2:promote", headers=ADMIN)
            promoted_at.append(len(answers))
            await asyncio.gather(*loaders)
            return answers, promoted

    answers, promoted = asyncio.run(scenario())
    assert promoted.status_code == 200, promoted.text
    assert promoted.json() == {
        "model": "delivery_eta",
        "version": 2,
        "previous_version": 1,
        "served": True,
    }
    assert [a.text for a in answers if a.status_code != 200] == []
    versions = [a.json()["predictions"][0]["model_version"] for a in answers]
    assert versions[0] == 1
    # Once the promote answered, every request gets the new version; requests in flight
    # across the swap finish with the version they were given (one batcher per version, so
    # their completion order is not the order of the swap).
    assert {v for v, after in zip(versions, sent_after, strict=True) if after} == {2}
    assert sum(sent_after) >= 90  # the loaders ran on well after the swap
    assert len(answers) >= 150
    assert registry.production("delivery_eta") == 2


def test_health_models_metrics_and_docs(client):
    client.post("/predict", json={"rows": [row(i) for i in range(3)]})
    health = client.get("/health").json()
    assert health["status"] == "ok"
    assert health["models"] == {"delivery_eta": 1, "delivery_eta_batch_only": 1}
    models = client.get("/models").json()
    assert [m["name"] for m in models["registry"]] == ["delivery_eta", "delivery_eta_batch_only"]
    assert models["serving"]["delivery_eta"]["features"] == list(delivery_eta.feature_refs())
    metrics = client.get("/metrics").text
    assert 'sluice_predictions_total{model="delivery_eta",version="1"} 3.0' in metrics
    assert 'sluice_requests_total{route="/predict",status="200"}' in metrics
    assert "sluice_batch_size" in metrics
    assert "sluice_feature_age_seconds_bucket" in metrics
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/feedback", "/models", "/health", "/metrics"} <= set(spec["paths"])
    assert "/models/{name}/versions/{version}:promote" in spec["paths"]
    assert client.get("/docs").status_code == 200


def _booster(model_str: str) -> Any:
    import lightgbm as lgb

    return lgb.Booster(model_str=model_str)


def test_bandit_serves_several_versions_and_feedback_goes_to_the_topic_only(
    tmp_path, registry, reader, producer
):
    from core.records import FeedbackRecord
    from serving.policy_state import MemoryPolicyStore

    settings = settings_for(tmp_path, bandit_epsilon=1.0, bandit_arms=2)
    store = MemoryPolicyStore()
    app = create_app(
        settings, reader=reader, registry=registry, producer=producer, policy_store=store
    )
    with TestClient(app) as client:
        answer = client.post("/predict", json={"rows": [row(i) for i in range(40)]}).json()
        versions = {p["model_version"] for p in answer["predictions"]}
        assert versions == {1, 2}  # epsilon 1: always exploring both arms
        for p in answer["predictions"]:
            client.post("/feedback", json={"prediction_id": p["prediction_id"], "label": 600.0})
    feedback = [
        FeedbackRecord.decode(m.value())
        for m in producer.delivered
        if m.topic() == settings.feedback_topic
    ]
    assert len(feedback) == 40
    assert all(record.matched for record in feedback)
    # The policy learns only from the feedback consumer (each label once, on any replica).
    assert store.hashes == {}
