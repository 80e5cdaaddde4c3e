"""Deadlines on /predict with a fake online store: a stuck or failing store is answered within
the request's deadline with degraded rows (flagged in the answer, the log and the metrics), or
503/504 when the server rejects; the breaker stops asking a dead store and recovers."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient

from core.records import PredictionRecord
from core.settings import Settings, load_settings
from examples.delivery.features import delivery_eta, restaurant_orders, zone_couriers
from feature_repo.errors import OnlineStoreUnavailableError
from features.contract import window_end_at
from models.registry import ModelRegistry
from serving.app import create_app
from serving.deadlines import budget_s
from serving.errors import InvalidRequestError
from tests.helpers.serving import FakeProducer, FakeReader, random_row, trained_registry

VIEWS = [v.name for v in delivery_eta.views]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return trained_registry(tmp_path_factory.mktemp("models"), delivery_eta)


@pytest.fixture
def reader() -> FakeReader:
    reader = FakeReader()
    rng = random.Random(5)
    now = int(time.time() * 1000)
    for view in delivery_eta.views:
        keys = ["z0", "z1"] if view is zone_couriers else ["r000", "r001"]
        for key in keys:
            reader.put(view, key, window_end_at(view, now), random_row(view, rng))
    return reader


def row(i: int = 0) -> dict[str, Any]:
    return {
        "restaurant_id": f"r00{i % 2}",
        "zone_id": f"z{i % 2}",
        "distance_km": 2.0,
        "hour_of_day": 12,
        "items": 2,
    }


def app_for(
    registry: ModelRegistry, reader: FakeReader, producer: FakeProducer, **overrides: Any
) -> Any:
    settings = load_settings(
        models_dir=str(registry.root), serve_models=["delivery_eta"], **overrides
    )
    return create_app(settings, reader=reader, registry=registry, producer=producer)


@pytest.fixture
def producer() -> FakeProducer:
    return FakeProducer()


@pytest.fixture
def client(registry, reader, producer) -> Iterator[TestClient]:
    with TestClient(app_for(registry, reader, producer)) as client:
        yield client


def test_budget_from_body_header_and_settings():
    settings = Settings(request_deadline_ms=800, request_deadline_max_ms=5000)
    assert budget_s(None, None, settings) == 0.8
    assert budget_s(200, None, settings) == 0.2
    assert budget_s(None, "300", settings) == 0.3
    assert budget_s(200, "150.5", settings) == 0.1505  # the smaller wins
    assert budget_s(60_000, None, settings) == 5.0  # capped at the maximum
    for bad in ("soon", "0", "-5", "nan", "inf"):
        with pytest.raises(InvalidRequestError, match="X-Request-Timeout-Ms"):
            budget_s(None, bad, settings)


def test_bad_deadlines_are_422_naming_the_field(client):
    answer = client.post("/predict", json={"rows": [row()]}, headers={"X-Request-Timeout-Ms": "x"})
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["field"] == "header X-Request-Timeout-Ms"
    answer = client.post("/predict", json={"rows": [row()], "deadline_ms": 0})
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["field"] == "deadline_ms"


def test_a_healthy_store_is_not_degraded(client):
    answer = client.post("/predict", json={"rows": [row(0), row(1)], "deadline_ms": 5000})
    assert answer.status_code == 200
    assert [p["degraded"] for p in answer.json()["predictions"]] == [[], []]


def test_a_stuck_store_is_answered_degraded_within_the_deadline(registry, reader, producer):
    reader.delay_s = 2.0  # every read hangs for two seconds
    app = app_for(registry, reader, producer)

    async def scenario() -> list[tuple[float, httpx.Response]]:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ):

            async def one(i: int) -> tuple[float, httpx.Response]:
                started = time.perf_counter()
                answer = await client.post(
                    "/predict", json={"rows": [row(i)]}, headers={"X-Request-Timeout-Ms": "150"}
                )
                return time.perf_counter() - started, answer

            # The first batch hangs on the store; the later requests queue behind it.
            first = asyncio.ensure_future(one(0))
            await asyncio.sleep(0.05)
            answers = await asyncio.gather(first, *(one(i) for i in range(1, 6)))
            batcher = app.state.predictor.served["delivery_eta"].batchers.batchers[1]
            assert batcher.batches <= 1  # answered before the stuck batch came back
            return answers

    answers = asyncio.run(scenario())
    for elapsed, answer in answers:
        assert answer.status_code == 200, answer.text
        # A 150 ms deadline: answered long before the stuck read (2 s) came back. The bound
        # is loose on purpose (a loaded CI machine delays the event loop by tens of ms); the
        # batch count above shows no answer waited for the store.
        assert elapsed < 1.0, elapsed
        assert answer.json()["predictions"][0]["degraded"] == VIEWS
    # Leaving the lifespan drained the log: one record per answer, flagged degraded.
    records = [PredictionRecord.decode(m.value()) for m in producer.delivered]
    assert len(records) == 6
    assert all(r.degraded == VIEWS for r in records)
    assert all(r.window_ends_ms == dict.fromkeys(VIEWS) for r in records)


def test_reject_mode_answers_504_at_the_deadline(registry, reader, producer):
    reader.delay_s = 2.0
    app = app_for(registry, reader, producer, serve_store_unavailable="reject")
    with TestClient(app) as client:
        started = time.perf_counter()
        answer = client.post("/predict", json={"rows": [row()], "deadline_ms": 100})
        elapsed = time.perf_counter() - started
    assert answer.status_code == 504
    assert answer.json()["error"] == "deadline_exceeded"
    # Answered before the stuck read (2 s) came back; the margin is for a loaded machine
    # (0.45 s was seen in CI for this 100 ms deadline).
    assert elapsed < 1.0
    assert producer.delivered == []  # nothing answered, nothing logged


def test_reject_mode_answers_503_when_the_store_is_down(registry, reader, producer):
    reader.fail = OnlineStoreUnavailableError("connection refused")
    app = app_for(registry, reader, producer, serve_store_unavailable="reject")
    with TestClient(app) as client:
        answer = client.post("/predict", json={"rows": [row()]})
    assert answer.status_code == 503
    assert answer.json()["error"] == "feature_store_unavailable"


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_down_store_degrades_opens_the_breaker_and_recovers(registry, reader, producer):
    with TestClient(app_for(registry, reader, producer, breaker_open_ms=BREAKER_OPEN_MS)) as client:
        breaker_scenario(client, reader)


# The breaker's open period: the ten requests below fit in it even on a loaded machine (1 s did
# not, once in CI: a fourth read, the half-open probe).
BREAKER_OPEN_MS = 3000


def breaker_scenario(client: TestClient, reader: FakeReader) -> None:
    reader.fail = OnlineStoreUnavailableError("connection refused")
    answers = [client.post("/predict", json={"rows": [row(i)]}) for i in range(10)]
    assert [a.status_code for a in answers] == [200] * 10
    assert all(a.json()["predictions"][0]["degraded"] == VIEWS for a in answers)
    assert len(reader.calls) == 3  # three failures opened the breaker; then never asked
    assert client.get("/health").json()["feature_store"] == "open"
    metrics = client.get("/metrics").text
    reasons = 'sluice_degraded_rows_total{model="delivery_eta",reason="%s"}'
    assert metric(metrics, reasons % "store_unavailable") == 3
    assert metric(metrics, reasons % "breaker_open") == 7
    assert metric(metrics, "sluice_breaker_state ") == 2
    # The store returns; after the open period one probe closes the breaker.
    reader.fail = None
    time.sleep(BREAKER_OPEN_MS / 1000)
    answer = client.post("/predict", json={"rows": [row()]})
    assert answer.json()["predictions"][0]["degraded"] == []
    assert client.get("/health").json()["feature_store"] == "closed"
    metrics = client.get("/metrics").text
    assert metric(metrics, 'sluice_breaker_transitions_total{to="open"}') == 1
    assert metric(metrics, 'sluice_breaker_transitions_total{to="half_open"}') == 1
    assert metric(metrics, 'sluice_breaker_transitions_total{to="closed"}') == 1
    assert metric(metrics, "sluice_breaker_state ") == 0


def test_degraded_rows_predict_from_the_views_empty_values(client, reader, registry):
    reader.fail = OnlineStoreUnavailableError("timeout")
    degraded = client.post("/predict", json={"rows": [row()], "return_features": True}).json()
    reader.fail = None
    unknown = dict(row(), restaurant_id="never-seen", zone_id="never-seen")
    missing = client.post("/predict", json={"rows": [unknown], "return_features": True}).json()
    got, want = degraded["predictions"][0], missing["predictions"][0]
    assert got["features"] == want["features"]  # the same defaults as an entity without rows
    assert got["prediction"] == pytest.approx(want["prediction"])
    assert want["degraded"] == []
    assert set(VIEWS) <= set(want["missing"])


def test_prediction_records_without_degraded_still_decode():
    old = orjson.loads(
        PredictionRecord(
            "p", 1, "m", 1, 1.0, 1.0, {}, {}, {}, [], [], degraded=[restaurant_orders.name]
        ).encode()
    )
    assert PredictionRecord.decode(orjson.dumps(old)).degraded == [restaurant_orders.name]
    del old["degraded"]
    assert PredictionRecord.decode(orjson.dumps(old)).degraded is None


def test_settings_name_bad_deadline_values(tmp_path: Path):
    from core.errors import SettingsError

    with pytest.raises(SettingsError, match="request_deadline_max_ms: 100 is below"):
        load_settings(request_deadline_ms=500, request_deadline_max_ms=100)
    with pytest.raises(SettingsError, match="serve_store_unavailable: expected degraded or rej"):
        load_settings(serve_store_unavailable="drop")
