"""`sluice monitor` against a real broker, Redis and Spark: drift, skew and live error found
in the prediction log, exactly where they were put, and nothing else.

The world: window rows of every view of delivery_eta for one servable window, written to the
offline store (Spark) and to Redis alike; two model versions trained on a point-in-time
training set of those rows (batch.training, so the references hold exactly what training
saw). Then, after training, a wrong count is written to Redis for a few restaurants (the
skew), and six periods of predictions are made by the predictor's own batch step
(serving.model.predict_batch: real Redis reads, the contract's choice of rows, LightGBM) at
chosen times and logged as the predictor logs them, with feedback for most of them. From the
fourth period on, distance_km is shifted (the drift). The monitor must flag exactly
distance_km from the drifted period on (no alarm in the clean ones), exactly the skewed
entities among the sampled rows of every period, and a live MAE per version equal to the
one recomputed here from the logs.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from core.kafka import CountingProducer, read_topics
from core.records import FeedbackRecord, PredictionRecord
from core.settings import Settings
from examples.delivery.features import delivery_eta, restaurant_orders, zone_couriers
from feature_repo.online_store import OnlineRow
from features.contract import window_end_at
from features.definitions import FeatureSpec, FeatureView, empty_value
from features.schema import FieldType
from models.fit import fit
from models.registry import ModelRegistry
from monitoring.records import AlertRecord, MonitorRecord, decode_monitoring
from monitoring.runner import MonitorSummary, run_monitor
from monitoring.skew import in_sample, sample_key
from serving.model import PredictItem, load_model, predict_batch
from tests.helpers.stream import patient_store

pytestmark = [pytest.mark.integration, pytest.mark.spark, pytest.mark.slow]

E_MS = int(datetime(2026, 11, 10, 12, 0, tzinfo=UTC).timestamp() * 1000)
PERIOD_MS = 5_000
SERVE_START = E_MS + 10_000  # E(t) = E for t in [E + 5 s, E + 65 s): one window throughout
PERIODS = 6
DRIFT_FROM = 3  # periods 0-2 clean, 3-5 with distance_km shifted
ROWS_PER_PERIOD = 1200
SAMPLE = 0.5
RESTAURANTS = [f"r{i:03d}" for i in range(120)]
ZONES = [f"z{i:02d}" for i in range(10)]
SKEWED = {"r007", "r019", "r033", "r048"}


@dataclasses.dataclass
class World:
    settings: Settings
    predictions: list[PredictionRecord]
    feedback: list[FeedbackRecord]


def monitor_settings(stack_settings: Settings, tmp: Path, name: str, **extra: Any) -> Settings:
    run = uuid.uuid4().hex[:8]
    return stack_settings.model_copy(
        update={
            "feast_project": f"{name}_{run}",
            "offline_store_dir": tmp / "offline",
            "models_dir": str(tmp / "models"),
            "state_dir": tmp / "state",
            "prediction_topic": f"test.predictions.{run}",
            "feedback_topic": f"test.feedback.{run}",
            "monitoring_topic": f"test.monitoring.{run}",
            "monitor_group": f"test-monitor-{run}",
            "monitor_period_s": PERIOD_MS / 1000,
            "monitor_grace_s": 1.0,
            "monitor_min_rows": 100,
            "monitor_skew_sample": SAMPLE,
            "spark_master": "local[2]",
            **extra,
        }
    )


def _value(spec: FeatureSpec, rng: np.random.Generator) -> Any:
    if spec.dtype is FieldType.INT:
        return int(rng.integers(0, 40))
    if empty_value(spec.function) is None and rng.random() < 0.1:
        return None  # a mean or stddev of an empty window; sums and counts are never null
    return round(float(rng.gamma(3.0, 4.0)), 3)


def view_rows(view: FeatureView, keys: list[str], end_ms: int, seed: int) -> list[OnlineRow]:
    rng = np.random.default_rng(seed)
    return [
        OnlineRow(
            key,
            end_ms,
            {s.name: _value(s, rng) for s in view.features()},
        )
        for key in keys
    ]


def write_window_rows(spark: Any, settings: Settings, at_ms: int) -> dict[str, list[OnlineRow]]:
    """The window due at ``at_ms`` of every view, in the offline store and in Redis."""
    from pyspark.sql.types import StringType, StructField, StructType, TimestampType

    from batch.compile import spark_type
    from batch.offline_store import write_offline

    out = {}
    for n, view in enumerate(delivery_eta.views):
        keys = ZONES if view is zone_couriers else RESTAURANTS
        end = window_end_at(view, at_ms)
        rows = view_rows(view, keys, end, seed=n)
        schema = StructType(
            [
                StructField(view.entity.join_key, StringType()),
                StructField("event_timestamp", TimestampType()),
                *(StructField(s.name, spark_type(s.dtype)) for s in view.features()),
            ]
        )
        stamp = datetime.fromtimestamp(end / 1000, UTC)
        frame = spark.createDataFrame(
            [(r.entity_key, stamp, *(r.values[s.name] for s in view.features())) for r in rows],
            schema,
        )
        write_offline(settings, view, frame, [stamp.date()])
        with patient_store(settings) as store:
            store.write(view, rows)
        out[view.name] = rows
    return out


def train_versions(
    spark: Any, settings: Settings, label_start_ms: int = E_MS + 5_000, seed: int = 5
) -> ModelRegistry:
    """Two versions trained on the point-in-time training set of the stored rows, with label
    times in the minute from label_start_ms."""
    import pandas as pd

    from batch.training import training_set

    rng = np.random.default_rng(seed)
    n = 2400
    labels = pd.DataFrame(
        {
            "restaurant_id": rng.choice(RESTAURANTS, n),
            "zone_id": rng.choice(ZONES, n),
            "event_timestamp": label_start_ms + np.sort(rng.integers(0, 60_000, n)),
            "distance_km": rng.uniform(0.5, 8.0, n).round(3),
            "hour_of_day": np.full(n, 12),
            "items": rng.integers(1, 7, n),
        }
    )
    frame = training_set(spark, settings, delivery_eta, spark.createDataFrame(labels)).toPandas()
    frame = frame.sort_values("event_timestamp").reset_index(drop=True)
    frame["delivery_seconds"] = (
        600
        + 90 * frame["distance_km"]
        + 25 * frame["items"]
        + 4 * frame["restaurant_orders__count_15m"].fillna(0)
        + rng.normal(0, 60, n)
    )
    registry = ModelRegistry(settings.models_dir)
    for rounds in (60, 12):
        trained = fit(frame, delivery_eta, label="delivery_seconds", rounds=rounds)
        assert trained.metadata.reference is not None
        registry.save(trained.model_text, trained.metadata)
    registry.promote("delivery_eta", 1)
    return registry


def log_record(prediction: Any, row: dict[str, Any], latency_ms: float) -> PredictionRecord:
    """The record the predictor logs for one answered row (serving.app.Predictor.record)."""
    joined = prediction.joined
    fields = {f.name for f in dataclasses.fields(PredictionRecord)}
    optional = {
        name: getattr(joined, attribute)
        for name, attribute in (
            ("window_ends_ms", "window_ends_ms"),
            ("row_status", "status"),
            ("as_of_ms", "as_of_ms"),
        )
        if name in fields and hasattr(joined, attribute)
    }
    if "row_status" in optional:
        optional["row_status"] = {k: str(v) for k, v in optional["row_status"].items()}
    return PredictionRecord(
        prediction_id=prediction.prediction_id,
        time_ms=prediction.time_ms,
        model=prediction.model,
        model_version=prediction.version,
        prediction=prediction.prediction,
        latency_ms=latency_ms,
        request=dict(row),
        features=joined.values,
        feature_ages_ms=joined.ages_ms,
        missing=joined.missing,
        stale=joined.stale,
        **optional,
    )


def make_traffic(
    settings: Settings,
    registry: ModelRegistry,
    times: list[int],
    rows_per_time: int,
    shift_from_ms: int | None,
    seed: int = 9,
) -> tuple[list[PredictionRecord], list[FeedbackRecord]]:
    """Predictions at each time in ``times`` (one batch each, versions alternating), with
    distance_km shifted from ``shift_from_ms`` on, and feedback for 70% of them."""
    rng = random.Random(seed)
    services = {"delivery_eta": delivery_eta}
    models = {v: load_model(registry, services, "delivery_eta", v) for v in (1, 2)}
    predictions: list[PredictionRecord] = []
    feedback: list[FeedbackRecord] = []
    with patient_store(settings) as store:
        for t in times:
            items = []
            for i in range(rows_per_time):
                distance = rng.uniform(0.5, 8.0)
                if shift_from_ms is not None and t >= shift_from_ms:
                    distance = distance * 2 + 4
                row = {
                    "restaurant_id": rng.choice(RESTAURANTS),
                    "zone_id": rng.choice(ZONES),
                    "distance_km": round(distance, 3),
                    "hour_of_day": 12,
                    "items": rng.randint(1, 6),
                }
                items.append(PredictItem(models[1 + i % 2], row))
            for item, answer in zip(items, predict_batch(store, items, now_ms=t), strict=True):
                record = log_record(answer, dict(item.row), round(rng.uniform(1, 6), 3))
                predictions.append(record)
                if rng.random() < 0.7:
                    noise = rng.gauss(0, 40 if record.model_version == 1 else 90)
                    label = record.prediction + noise
                    matched = rng.random() < 0.5  # the server still knew the prediction
                    feedback.append(
                        FeedbackRecord(
                            record.prediction_id,
                            label,
                            t + 2_000,
                            *(
                                (record.model, record.model_version, record.prediction)
                                if matched
                                else ()
                            ),
                        )
                    )
    return predictions, feedback


def publish(settings: Settings, predictions: list[PredictionRecord], feedback: list[Any]) -> None:
    from core.kafka import ensure_topics

    ensure_topics(settings, [settings.prediction_topic, settings.feedback_topic])
    producer = CountingProducer(settings)
    for record in predictions:
        producer.produce(settings.prediction_topic, record.encode(), record.prediction_id)
    for item in feedback:
        producer.produce(settings.feedback_topic, item.encode(), item.prediction_id)
    producer.flush(60)


@pytest.fixture(scope="module")
def world(stack_settings: Settings, spark: Any, tmp_path_factory: pytest.TempPathFactory) -> World:
    settings = monitor_settings(stack_settings, tmp_path_factory.mktemp("monitor"), "monitor")
    write_window_rows(spark, settings, SERVE_START)
    registry = train_versions(spark, settings)
    # The skew: after training, a wrong 1-hour count in Redis for a few restaurants.
    end = window_end_at(restaurant_orders, SERVE_START)
    original = {r.entity_key: r for r in view_rows(restaurant_orders, RESTAURANTS, end, seed=0)}
    with patient_store(settings) as store:
        wrong = []
        for key in sorted(SKEWED):
            values = dict(original[key].values)
            values["count_1h"] = int(values["count_1h"]) + 1
            wrong.append(OnlineRow(key, end, values))
        report = store.write(restaurant_orders, wrong)
        assert report.rewritten == len(SKEWED)
    times = [
        SERVE_START + k * PERIOD_MS + b * (PERIOD_MS // 30)
        for k in range(PERIODS)
        for b in range(30)
    ]
    predictions, feedback = make_traffic(
        settings, registry, times, ROWS_PER_PERIOD // 30, SERVE_START + DRIFT_FROM * PERIOD_MS
    )
    publish(settings, predictions, feedback)
    return World(settings, predictions, feedback)


@pytest.fixture(scope="module")
def run(world: World) -> tuple[MonitorSummary, list[MonitorRecord | AlertRecord]]:
    summary = run_monitor(world.settings, idle_timeout_s=6)
    messages = read_topics(world.settings, [world.settings.monitoring_topic], idle_timeout_s=3)
    return summary, [decode_monitoring(m.value()) for m in messages]


def _period(ms: int) -> int:
    return ms - ms % PERIOD_MS


def test_drift_is_flagged_on_exactly_the_shifted_feature_from_its_period(run, world):
    summary, results = run
    drift_start = SERVE_START + DRIFT_FROM * PERIOD_MS
    assert summary.consumed["predictions"] == len(world.predictions)
    assert summary.late == {} or set(summary.late.values()) == {0}
    records = [r for r in results if isinstance(r, MonitorRecord)]
    alerts = [r for r in results if isinstance(r, AlertRecord)]
    drift = [r for r in records if r.check == "drift"]
    periods = {r.period_start_ms for r in drift}
    assert periods == {SERVE_START + k * PERIOD_MS for k in range(PERIODS)}
    assert {r.model_version for r in drift} == {1, 2}
    clean = [r for r in drift if r.period_start_ms < drift_start]
    assert [(r.feature, r.period_start_ms, r.values) for r in clean if r.band == "drift"] == []
    # No alarm in the clean periods, of any check but skew (which is there from the start).
    assert [
        a.message for a in alerts if a.period_start_ms < drift_start and a.check != "skew"
    ] == []
    flagged = [a for a in alerts if a.check == "drift"]
    assert {a.feature for a in flagged} == {"order_request:distance_km"}
    for version in (1, 2):
        first = min(a.period_start_ms for a in flagged if a.model_version == version)
        assert first <= drift_start + PERIOD_MS  # within two periods (here: the first)
        assert {a.period_start_ms for a in flagged if a.model_version == version} == {
            drift_start + k * PERIOD_MS for k in range(PERIODS - DRIFT_FROM)
        }
    for record in drift:
        assert record.rows == ROWS_PER_PERIOD // 2
        assert record.values.get("reference") is None  # both versions have a reference


def test_skew_names_exactly_the_skewed_entities_of_the_sample(run, world):
    _, results = run
    expected: dict[tuple[int, int | None], set[str]] = defaultdict(set)
    sampled: dict[tuple[int, int | None], int] = defaultdict(int)
    wrong_rows: dict[tuple[int, int | None], int] = defaultdict(int)
    for record in world.predictions:
        key = (_period(record.time_ms), record.model_version)
        if not in_sample(sample_key(delivery_eta, record.request), SAMPLE):
            continue
        sampled[key] += 1
        restaurant = record.request["restaurant_id"]
        if restaurant in SKEWED:
            expected[key].add(f"restaurant_orders:{restaurant}")
            wrong_rows[key] += 1
    skew = {
        (r.period_start_ms, r.model_version): r
        for r in results
        if isinstance(r, MonitorRecord) and r.check == "skew"
    }
    assert set(skew) == set(sampled)
    assert len(skew) == 2 * PERIODS
    for key, record in skew.items():
        assert record.values.get("error") is None, record.values
        assert record.values["sampled_rows"] == sampled[key]
        assert record.values["compared_rows"] == sampled[key]
        assert set(record.items) == expected[key], key
        assert record.values["mismatched_rows"] == wrong_rows[key]
        assert record.values["missing_rows"] == 0
        assert record.values["extra_rows"] == 0
        off = {k for k, v in record.values.items() if k.startswith("mismatch:") and v}
        assert off == ({"mismatch:restaurant_orders:count_1h"} if wrong_rows[key] else set())
    # Flagged from the first period on: within two periods of the skew.
    first = min(p for (p, _), r in skew.items() if r.items)
    assert first <= SERVE_START + PERIOD_MS


def test_live_mae_by_version_equals_a_recomputation_from_the_logs(run, world):
    summary, results = run
    predicted = {p.prediction_id: p for p in world.predictions}
    errors: dict[int, list[float]] = defaultdict(list)
    for item in world.feedback:
        p = predicted[item.prediction_id]
        errors[p.model_version].append(abs(item.label - p.prediction))
    assert set(summary.mae) == {("delivery_eta", 1), ("delivery_eta", 2)}
    for version, values in errors.items():
        totals = summary.mae[("delivery_eta", version)]
        assert totals.labels == len(values)
        assert totals.mae == pytest.approx(sum(values) / len(values), rel=1e-9)
    live = [r for r in results if isinstance(r, MonitorRecord) and r.check == "live_error"]
    assert {r.model_version for r in live} == {1, 2}
    assert sum(r.rows for r in live) <= len(world.feedback)
    for record in live:
        assert record.values["training_mae"] is not None
        assert record.values["mae"] is not None


def test_freshness_serving_and_restart(run, world, tmp_path, capsys):
    _, results = run
    records = [r for r in results if isinstance(r, MonitorRecord)]
    freshness = [r for r in records if r.check == "freshness"]
    assert {r.view for r in freshness} == {v.name for v in delivery_eta.views}
    assert all(r.values["behind_rate"] == 0 and r.band == "none" for r in freshness)
    serving = [r for r in records if r.check == "serving"]
    assert len(serving) == PERIODS
    for record in serving:
        assert record.rows == ROWS_PER_PERIOD
        assert record.values["share_v1"] == pytest.approx(0.5)
        assert record.values["batch_mean"] == pytest.approx(ROWS_PER_PERIOD / 30)

    # `sluice monitor` again, same group: everything was committed, nothing is read twice.
    from cli.main import run as sluice

    config = tmp_path / "sluice.yaml"
    s = world.settings
    fields = (
        "kafka_bootstrap",
        "redis_url",
        "feast_project",
        "models_dir",
        "prediction_topic",
        "feedback_topic",
        "monitoring_topic",
        "monitor_group",
        "monitor_period_s",
        "monitor_grace_s",
        "monitor_min_rows",
        "monitor_skew_sample",
        "spark_master",
    )
    values = {name: getattr(s, name) for name in fields}
    values |= {"offline_store_dir": str(s.offline_store_dir), "state_dir": str(s.state_dir)}
    config.write_text(yaml.safe_dump(values))
    code = sluice(["--config", str(config), "monitor", "--idle-timeout", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "read: nothing" in out
    assert "0 results, 0 alerts" in out
