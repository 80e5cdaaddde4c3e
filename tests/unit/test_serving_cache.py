"""Prediction cache: bytes bound, LRU evictions, counts, single flight; and in the predictor:
only uncached vectors reach the model, fresh features miss, the dashboard reads the hit rate."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from core.settings import load_settings
from examples.delivery.features import (
    delivery_eta,
    restaurant_orders,
    restaurant_prep,
    zone_couriers,
)
from features.contract import window_end_at
from monitoring.traffic import CacheScraper
from serving.app import create_app
from serving.cache import ENTRY_OVERHEAD, CacheCollector, PredictionCache
from tests.helpers.serving import FakeProducer, FakeReader, random_row, trained_registry


class Model:
    """Counts the rows it is asked to predict; prediction = row sum."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.rows = 0
        self.calls = 0
        self.gate = gate
        self.entered = threading.Event()

    def __call__(self, matrix: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        self.calls += 1
        self.rows += len(matrix)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        return np.asarray(matrix.sum(axis=1), dtype=np.float64)


def matrix(*rows: list[float]) -> npt.NDArray[np.float64]:
    return np.array(rows, dtype=np.float64)


def test_hits_misses_and_the_key_is_model_version_and_vector():
    cache, model = PredictionCache(1 << 20), Model()
    first = cache.predict("m", 1, matrix([1, 2], [3, np.nan]), model)
    assert first[0] == 3
    assert np.isnan(first[1])
    again = cache.predict("m", 1, matrix([3, np.nan], [1, 2], [5, 5]), model)
    assert again[1:].tolist() == [3, 10]
    assert np.isnan(again[0])
    assert (model.calls, model.rows) == (2, 3)  # only [5, 5] was new the second time
    cache.predict("m", 2, matrix([1, 2]), model)  # another version: another key
    cache.predict("other", 1, matrix([1, 2]), model)  # another model too
    cache.predict("m", 1, matrix([1, 2.5]), model)  # a fresh feature value too
    assert (cache.hits, cache.misses, cache.shared) == (2, 6, 0)
    assert len(cache) == 6


def test_bytes_stay_within_the_bound_and_the_least_recently_used_go_first():
    entry = len(np.zeros(4).tobytes()) + len(b"m\x001\x00") + 33 + ENTRY_OVERHEAD  # 33: bytes
    cache, model = PredictionCache(10 * entry), Model()
    for i in range(10):
        cache.predict("m", 1, matrix([i, 0, 0, 0]), model)
    assert (len(cache), cache.bytes, cache.evictions) == (10, 10 * entry, 0)
    cache.predict("m", 1, matrix([0, 0, 0, 0]), model)  # touch row 0: now the newest
    for i in range(10, 15):
        cache.predict("m", 1, matrix([i, 0, 0, 0]), model)
        assert cache.bytes <= cache.max_bytes
    assert (len(cache), cache.evictions) == (10, 5)
    calls = model.calls
    cache.predict("m", 1, matrix([0, 0, 0, 0]), model)  # kept: it was used recently
    assert model.calls == calls
    cache.predict("m", 1, matrix([1, 0, 0, 0]), model)  # evicted: computed again
    assert model.calls == calls + 1
    assert PredictionCache(10).predict("m", 1, matrix([1, 1]), model).tolist() == [2]  # too big


def test_identical_rows_in_a_batch_are_predicted_once():
    cache, model = PredictionCache(1 << 20), Model()
    got = cache.predict("m", 1, matrix([1, 1], [2, 2], [1, 1], [1, 1]), model)
    assert got.tolist() == [2, 4, 2, 2]
    assert (model.rows, cache.misses, cache.shared, cache.hits) == (2, 2, 2, 0)


def test_identical_in_flight_requests_share_one_computation():
    gate = threading.Event()
    cache, model = PredictionCache(1 << 20), Model(gate)
    results: dict[str, Any] = {}

    def first() -> None:
        results["first"] = cache.predict("m", 1, matrix([1, 2], [3, 4]), model).tolist()

    def second() -> None:
        results["second"] = cache.predict("m", 1, matrix([3, 4], [5, 6]), model).tolist()

    one = threading.Thread(target=first)
    one.start()
    assert model.entered.wait(5)  # first is computing [1, 2] and [3, 4]
    two = threading.Thread(target=second)
    two.start()
    time.sleep(0.05)
    gate.set()
    one.join(5)
    two.join(5)
    assert results == {"first": [3, 7], "second": [7, 11]}
    assert model.rows == 3  # [3, 4] once, though two requests wanted it at the same time
    assert (cache.misses, cache.shared, cache.hits) == (3, 1, 0)


def test_a_failed_computation_reaches_its_waiters_and_caches_nothing():
    def broken(m: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        raise RuntimeError("model exploded")

    cache = PredictionCache(1 << 20)
    with pytest.raises(RuntimeError, match="exploded"):
        cache.predict("m", 1, matrix([1, 2]), broken)
    assert len(cache) == 0
    model = Model()
    assert cache.predict("m", 1, matrix([1, 2]), model).tolist() == [3]  # not stuck in flight


def test_collector_exports_what_the_dashboard_reads(monkeypatch):
    cache, model = PredictionCache(1 << 20), Model()
    cache.predict("m", 1, matrix([1], [2], [1]), model)
    cache.predict("m", 1, matrix([1], [3]), model)
    registry = CollectorRegistry()
    registry.register(CacheCollector(cache))
    text = generate_latest(registry).decode()
    for line in [
        "sluice_cache_hits_total 1.0",
        "sluice_cache_misses_total 3.0",
        "sluice_cache_shared_total 1.0",
        "sluice_cache_evictions_total 0.0",
        "sluice_cache_entries 3.0",
    ]:
        assert line in text

    class Answer:
        pass

    answer = Answer()
    answer.text = text  # type: ignore[attr-defined]
    monkeypatch.setattr("httpx.get", lambda *a, **k: answer)
    reading = CacheScraper("http://predictor").scrape(0)
    assert reading is not None
    assert (reading.hits, reading.misses) == (1, 3)


def test_the_predictor_sends_only_uncached_vectors_to_the_model(tmp_path: Path):
    registry = trained_registry(tmp_path / "models", delivery_eta)
    reader, rng = FakeReader(), random.Random(5)
    for view, keys in [
        (restaurant_orders, ["r000", "r001"]),
        (restaurant_prep, ["r000", "r001"]),
        (zone_couriers, ["z0"]),
    ]:
        for key in keys:
            reader.put(
                view, key, window_end_at(view, int(time.time() * 1000)), random_row(view, rng)
            )
    settings = load_settings(models_dir=str(tmp_path / "models"), serve_models=["delivery_eta"])
    app = create_app(settings, reader=reader, registry=registry, producer=FakeProducer())
    rows = [
        {
            "restaurant_id": f"r00{i % 2}",
            "zone_id": "z0",
            "distance_km": 2,
            "hour_of_day": 3,
            "items": 1,
        }
        for i in range(4)
    ]
    with TestClient(app) as client:
        first = client.post("/predict", json={"rows": rows}).json()["predictions"]
        second = client.post("/predict", json={"rows": rows}).json()["predictions"]
        cache = app.state.predictor.cache
        assert [p["prediction"] for p in first] == [p["prediction"] for p in second]
        # Two distinct vectors; the other 6 rows were hits or shared, as batches happened to form.
        assert (cache.misses, cache.shared + cache.hits) == (2, 6)
        # A fresh value of a feature: a new vector, predicted again.
        stored = reader.rows[("restaurant_orders", "r000")]
        fresh = {
            k: (v or 0) + 1 if isinstance(v, int | float) else v for k, v in stored.values.items()
        }
        reader.put(restaurant_orders, "r000", stored.window_end_ms, fresh)
        client.post("/predict", json={"rows": rows[:1]})
        assert cache.misses == 3
        assert f"sluice_cache_hits_total {float(cache.hits)}" in client.get("/metrics").text
