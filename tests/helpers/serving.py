"""Shared pieces of the predictor tests: synthetic training sets, a fake online store, a fake
Kafka producer and a small trained model registry."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from feature_repo.online_store import OnlineRow
from features.definitions import FeatureService, FeatureView
from features.schema import FieldType
from models.fit import fit, model_features
from models.registry import ModelRegistry

START_MS = 1_795_000_000_000 - 1_795_000_000_000 % 86_400_000
# The admin token of test apps (settings admin_tokens), and the header that sends it.
ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def synthetic_training_set(service: FeatureService, n: int = 600, seed: int = 1) -> pd.DataFrame:
    """Rows with every training-set column of the service and a label that depends on them."""
    rng = np.random.default_rng(seed)
    frame: dict[str, Any] = {
        "event_timestamp": START_MS + np.sort(rng.integers(0, 7 * 86_400_000, n)),
        "restaurant_id": [f"r{i % 20:03d}" for i in range(n)],
        "zone_id": [f"z{i % 5}" for i in range(n)],
    }
    label = np.full(n, 600.0)
    for ref, column in model_features(service):
        if ref.startswith("order_request:"):
            continue
        values = rng.gamma(2.0, 3.0, n)
        if rng.random() < 0.5:
            values = np.round(values)
        values[rng.random(n) < 0.05] = np.nan  # some nulls, as empty windows give
        frame[column] = values
        label += np.nan_to_num(values) * 7
    frame["distance_km"] = rng.uniform(0.2, 12, n)
    frame["hour_of_day"] = rng.integers(0, 24, n)
    frame["items"] = rng.integers(1, 8, n)
    label += frame["distance_km"] * 120 + frame["items"] * 30 + rng.normal(0, 60, n)
    frame["delivery_seconds"] = label
    return pd.DataFrame(frame)


def trained_registry(root: Path, service: FeatureService, versions: int = 1) -> ModelRegistry:
    """A registry with ``versions`` versions of a model named after the service; v1 promoted."""
    registry = ModelRegistry(str(root))
    for version in range(versions):
        frame = synthetic_training_set(service, seed=version + 1)
        trained = fit(frame, service, label="delivery_seconds", rounds=20 + 10 * version)
        registry.save(trained.model_text, trained.metadata)
    registry.promote(service.name, 1)
    return registry


def random_row(view: FeatureView, rng: random.Random) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for spec in view.features():
        if spec.dtype is FieldType.INT:
            values[spec.name] = rng.randint(0, 30)
        else:
            values[spec.name] = None if rng.random() < 0.1 else round(rng.uniform(0, 50), 3)
    return values


class FakeReader:
    """An in-memory online store with OnlineStore.read_many's contract; counts round trips.

    ``put`` stores a newest row and optionally its previous one; ``empty`` is left unknown
    (None) unless given, so the predictor's own emptiness check is exercised too."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], OnlineRow] = {}
        self.calls: list[list[tuple[str, int]]] = []
        self.delay_s = 0.0
        self.fail: Exception | None = None
        self.progress: dict[str, int] = {}  # the stream's published progress per view
        self.order: list[str] = []  # "progress" / "rows", as read

    def put(
        self,
        view: FeatureView,
        key: str,
        end_ms: int,
        values: dict[str, Any],
        previous: tuple[int, dict[str, Any]] | None = None,
        empty: bool | None = None,
    ) -> None:
        kept = None if previous is None else OnlineRow(key, previous[0], previous[1])
        self.rows[(view.name, key)] = OnlineRow(key, end_ms, values, kept, empty)

    def read_many(
        self,
        requests: Sequence[tuple[FeatureView, Sequence[str]]],
        *,
        as_of_ms: int | None = None,
    ) -> list[list[OnlineRow | None]]:
        import time

        self.calls.append([(view.name, len(keys)) for view, keys in requests])
        self.order.append("rows")
        if self.fail is not None:
            raise self.fail
        if self.delay_s:
            time.sleep(self.delay_s)
        return [[self.rows.get((view.name, key)) for key in keys] for view, keys in requests]

    def read_progress(self, views: Sequence[FeatureView], max_age_ms: int = 0) -> dict[str, int]:
        self.order.append("progress")
        return {v.name: self.progress[v.name] for v in views if v.name in self.progress}


class FakeMessage:
    def __init__(self, topic: str, key: bytes, value: bytes) -> None:
        self._topic, self._key, self._value = topic, key, value

    def topic(self) -> str:
        return self._topic

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value


class FakeProducer:
    """Delivers on poll; the first ``failures`` deliveries fail with ``error`` (to exercise
    retries); while ``down``, poll reports nothing (a stopped broker)."""

    def __init__(self, failures: int = 0, error: Any = "_MSG_TIMED_OUT") -> None:
        self.failures = failures
        self.error = error
        self.down = False
        self.pending: list[tuple[FakeMessage, Any]] = []
        self.delivered: list[FakeMessage] = []
        self.lock = threading.Lock()

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Any) -> None:
        with self.lock:
            self.pending.append((FakeMessage(topic, key, value), on_delivery))

    def poll(self, timeout: float) -> int:
        if self.down:
            return 0
        with self.lock:
            pending, self.pending = self.pending, []
        for message, callback in pending:
            if self.failures > 0:
                self.failures -= 1
                callback(self.error, message)
            else:
                self.delivered.append(message)
                callback(None, message)
        return len(pending)

    def flush(self, timeout: float) -> int:
        self.poll(0)
        return 0
