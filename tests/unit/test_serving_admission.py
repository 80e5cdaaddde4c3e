"""Admission control (serving/admission.py): the prediction it refuses on, and /predict with a
slow fake store answering 503 overloaded (Retry-After, counted) only with serve_admission on."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import httpx
import pytest

from examples.delivery.features import delivery_eta, zone_couriers
from features.contract import window_end_at
from models.registry import ModelRegistry
from serving.admission import Admission, LoopLag
from tests.helpers.serving import FakeProducer, FakeReader, random_row, trained_registry
from tests.unit.test_serving_deadlines import app_for, row


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return trained_registry(tmp_path_factory.mktemp("models"), delivery_eta)


@pytest.fixture
def reader() -> FakeReader:
    reader = FakeReader()
    rng = random.Random(5)
    now = int(time.time() * 1000)
    for view in delivery_eta.views:
        for key in ["z0", "z1"] if view is zone_couriers else ["r000", "r001"]:
            reader.put(view, key, window_end_at(view, now), random_row(view, rng))
    return reader


def test_everything_is_admitted_until_a_batch_has_run():
    admission = Admission(20.0, LoopLag())
    assert admission.predicted_ms(queued=10_000, rows=1, size=1) == 0.0
    assert admission.admit(10_000, 1, 1) is None
    assert admission.refused == 0


def test_the_prediction_counts_lag_and_the_batches_queued_before_and_with_the_request():
    lag = LoopLag()
    admission = Admission(20.0, lag)
    admission.observe(4.0)
    assert admission.batch_ms == 4.0
    admission.observe(9.0)  # weighted: 4 + 0.2 * (9 - 4)
    assert admission.batch_ms == pytest.approx(5.0)
    assert admission.predicted_ms(queued=0, rows=1, size=8) == pytest.approx(5.0)
    assert admission.predicted_ms(queued=8, rows=1, size=8) == pytest.approx(10.0)
    assert admission.predicted_ms(queued=23, rows=2, size=8) == pytest.approx(20.0)
    lag.observe(0.003)  # 3 ms late, weighted: 0.6 ms
    assert admission.predicted_ms(queued=23, rows=2, size=8) == pytest.approx(20.6)
    assert admission.admit(queued=23, rows=1, size=8) is None  # 20 ms: within the objective
    assert admission.admit(queued=0, rows=100, size=8) is None  # first in line: admitted
    assert admission.admit(queued=23, rows=2, size=8) == pytest.approx(20.6)
    assert admission.refused == 1
    lag.observe(-1.0)  # an early wake-up is no negative lag
    assert lag.lag_s == pytest.approx(0.8 * 0.0006)


def _burst(app: Any, n: int, warm: int) -> list[httpx.Response]:
    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ):
            # Requests one at a time first (never refused: nothing queued), so that batches
            # have run and their time is known.
            for i in range(warm):
                first = await client.post("/predict", json={"rows": [row(i)]})
                assert first.status_code == 200, first.text
            answers = await asyncio.gather(
                *(client.post("/predict", json={"rows": [row(i)]}) for i in range(n))
            )
            metrics = await client.get("/metrics")
            return [*answers, metrics]

    return asyncio.run(scenario())


def _shed(metrics: httpx.Response) -> float:
    for line in metrics.text.splitlines():
        if line.startswith('sluice_shed_requests_total{model="delivery_eta"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("mode", ["objective", "off"])
def test_a_burst_behind_a_slow_store_is_shed_only_with_admission_on(registry, reader, mode):
    reader.delay_s = 0.03  # each batch takes 30 ms: more than the 20 ms objective
    producer = FakeProducer()
    app = app_for(
        registry, reader, producer, serve_admission=mode, latency_objective_ms=20, max_batch_size=4
    )
    *answers, metrics = _burst(app, 12, warm=1)
    refused = [a for a in answers if a.status_code == 503]
    answered = [a for a in answers if a.status_code == 200]
    assert len(refused) + len(answered) == 12  # nothing else
    if mode == "off":
        assert refused == []
        assert _shed(metrics) == 0
        return
    # The first of the burst is admitted (nothing queued), and each batch takes longer than
    # the objective, so every request queued behind it is refused.
    assert len(refused) == 11
    assert all(a.json()["error"] == "overloaded" for a in refused)
    assert all(a.headers["retry-after"] == "1" for a in refused)
    assert "latency objective of 20 ms" in refused[0].json()["detail"]
    assert _shed(metrics) == len(refused)
    assert len(producer.delivered) == 2  # only the admitted requests were predicted, logged


def test_requests_predicted_within_the_objective_are_admitted(registry, reader):
    # A generous objective: the in-process transport's own lag and batch times (milliseconds
    # on a loaded machine) stay well within it.
    app = app_for(
        registry, reader, FakeProducer(), serve_admission="objective", latency_objective_ms=5000
    )
    *answers, metrics = _burst(app, 12, warm=3)
    assert [a.status_code for a in answers] == [200] * 12
    assert _shed(metrics) == 0
