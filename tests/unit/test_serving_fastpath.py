"""POST /predict through the fast path (serving/fastpath.py) answers as the route does, and the
worker slots of `sluice serve --workers` (serving/workers.py)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.settings import load_settings
from examples.delivery.features import delivery_eta
from models.registry import ModelRegistry
from serving import workers
from serving.app import create_app
from serving.fastpath import PredictorApp
from tests.helpers.serving import FakeProducer, FakeReader, trained_registry

TOKEN = "predict-token-for-the-fast-path-test"
ROW = {"restaurant_id": "r001", "zone_id": "z1", "distance_km": 2.0, "hour_of_day": 12, "items": 2}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fastpath") / "models"
    trained_registry(root, delivery_eta)
    return root


def app_for(models_dir: Path, fast: bool) -> FastAPI:
    settings = load_settings(
        models_dir=str(models_dir),
        serve_models=["delivery_eta"],
        prediction_log_dir=tempfile.mkdtemp(prefix="log-", dir=models_dir.parent),
        predict_tokens=[TOKEN],
        max_request_rows=3,
        max_request_bytes=4096,
        # Both paths are compared answer for answer: a first request slowed past the default
        # 1 s deadline by a loaded CI machine would be answered "degraded" by one path only.
        request_deadline_ms=60_000,
        request_deadline_max_ms=60_000,
    )
    app = create_app(
        settings,
        reader=FakeReader(),
        registry=ModelRegistry(str(models_dir)),
        producer=FakeProducer(),
    )
    assert isinstance(app, PredictorApp)
    app.fast_path = fast
    return app


@pytest.fixture(scope="module")
def clients(models_dir: Path) -> Iterator[tuple[TestClient, TestClient]]:
    with (
        TestClient(app_for(models_dir, fast=True)) as fast,
        TestClient(app_for(models_dir, fast=False)) as route,
    ):
        yield fast, route


def auth(value: str) -> dict[str, str]:
    return {"Authorization": value}


CASES: list[tuple[str, Any, dict[str, str]]] = [
    ("valid", {"rows": [ROW, ROW]}, auth(f"Bearer {TOKEN}")),
    ("scheme in any case", {"rows": [ROW]}, auth(f"bEARER  {TOKEN} ")),
    ("features returned", {"rows": [ROW], "return_features": True}, auth(f"Bearer {TOKEN}")),
    ("no token", {"rows": [ROW]}, {}),
    ("unknown token", {"rows": [ROW]}, auth("Bearer nope")),
    ("basic scheme", {"rows": [ROW]}, auth(f"Basic {TOKEN}")),
    ("bad row", {"rows": [ROW | {"distance_km": "far"}]}, auth(f"Bearer {TOKEN}")),
    ("unknown model", {"model": "nope", "rows": [ROW]}, auth(f"Bearer {TOKEN}")),
    ("too many rows", {"rows": [ROW] * 4}, auth(f"Bearer {TOKEN}")),
    ("not json", b"{rows: ", auth(f"Bearer {TOKEN}")),
    ("too large", {"rows": [ROW | {"x": "y" * 5000}]}, auth(f"Bearer {TOKEN}")),
    ("bad timeout", {"rows": [ROW]}, auth(f"Bearer {TOKEN}") | {"X-Request-Timeout-Ms": "-1"}),
]


def comparable(body: dict[str, Any]) -> dict[str, Any]:
    """An answer without what differs between two calls (ids, ages counted from now)."""
    for prediction in body.get("predictions", []):
        prediction.pop("prediction_id")
        prediction.pop("feature_ages_ms")
    return body


@pytest.mark.parametrize(("case", "body", "headers"), CASES, ids=[c[0] for c in CASES])
def test_the_fast_path_answers_as_the_route(clients, case, body, headers):
    fast, route = clients
    answers = []
    for client in (fast, route):
        if isinstance(body, bytes):
            sent = client.post("/predict", content=body, headers=headers)
        else:
            sent = client.post("/predict", json=body, headers=headers)
        answers.append(sent)
    mine, theirs = answers
    assert mine.status_code == theirs.status_code, (case, mine.text, theirs.text)
    assert comparable(mine.json()) == comparable(theirs.json())
    assert mine.headers["content-type"] == theirs.headers["content-type"]
    assert mine.headers.get("www-authenticate") == theirs.headers.get("www-authenticate")


def test_fast_path_requests_are_counted_under_the_route(clients):
    fast, _ = clients

    def count() -> float:
        for line in fast.get("/metrics").text.splitlines():
            if line.startswith('sluice_requests_total{route="/predict",status="200"}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = count()
    assert fast.post("/predict", json={"rows": [ROW]}, headers=auth(f"Bearer {TOKEN}")).is_success
    assert count() == before + 1


def test_other_methods_and_paths_still_reach_the_router(clients):
    fast, _ = clients
    assert fast.get("/predict").status_code == 405
    assert fast.post("/predict/extra", json={}).status_code == 404


def test_worker_slots_are_distinct_and_reused(tmp_path):
    first = workers.claim_slot(tmp_path)
    second = workers.claim_slot(tmp_path)
    assert (first, second) == (0, 1)
    os.close(workers._claimed.pop())  # the second worker exits: its slot is free again
    assert workers.claim_slot(tmp_path) == 1
    assert workers.claim_slot(tmp_path) == 2
    for fd in workers._claimed[-3:]:
        os.close(fd)
    del workers._claimed[-3:]


def test_each_worker_has_its_own_prediction_log_directory(tmp_path):
    settings = load_settings(prediction_log_dir=tmp_path / "log")
    one, two = workers.worker_settings(settings), workers.worker_settings(settings)
    assert one.prediction_log_dir == tmp_path / "log" / "worker-0"
    assert two.prediction_log_dir == tmp_path / "log" / "worker-1"
    for fd in workers._claimed[-2:]:
        os.close(fd)
    del workers._claimed[-2:]


def test_a_chunked_body_above_the_limit_is_413_as_from_the_route(clients):
    fast, route = clients
    answers = []
    for client in (fast, route):
        chunks = iter([b'{"rows": [', b" " * 5000, b"]}"])  # no Content-Length: chunked
        answers.append(client.post("/predict", content=chunks, headers=auth(f"Bearer {TOKEN}")))
    mine, theirs = answers
    assert mine.status_code == theirs.status_code == 413
    assert mine.json() == theirs.json()


def test_the_fast_path_answers_before_the_middleware_stack(models_dir):
    app = app_for(models_dir, fast=True)
    with TestClient(app, raise_server_exceptions=False) as client:

        async def broken(scope: Any, receive: Any, send: Any) -> None:
            raise RuntimeError("the stack was used")

        app.middleware_stack = broken
        answer = client.post("/predict", json={"rows": [ROW]}, headers=auth(f"Bearer {TOKEN}"))
        assert answer.status_code == 200, answer.text
        assert client.get("/health").status_code == 500  # every other route goes through it


def test_an_unexpected_error_is_a_500_counted_under_the_route(models_dir, monkeypatch):
    app = app_for(models_dir, fast=True)
    with TestClient(app, raise_server_exceptions=False) as client:

        async def failing(*_args: Any) -> bytes:
            raise RuntimeError("boom")

        monkeypatch.setattr("serving.routes.predict_answer", failing)
        answer = client.post("/predict", json={"rows": [ROW]}, headers=auth(f"Bearer {TOKEN}"))
        assert (answer.status_code, answer.text) == (500, "Internal Server Error")
        metrics = client.get("/metrics").text
        assert 'sluice_requests_total{route="/predict",status="500"} 1.0' in metrics
