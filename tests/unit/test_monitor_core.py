"""The monitor without Kafka: references in the registry, records, periods, drift, freshness,
live error, skew comparison, offsets, the dashboard's JSON and the summary table."""

from __future__ import annotations

import functools
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from rich.console import Console

from cli.monitor import print_summary
from core.errors import RecordError
from core.records import FeatureRow, FeedbackRecord, PredictionRecord
from core.settings import load_settings
from examples.delivery.features import delivery_eta, restaurant_orders, zone_couriers
from models.fit import model_features
from models.registry import REFERENCE_FILE, ModelRegistry
from monitoring.dashboard import create_dashboard
from monitoring.live_error import FeedbackJoin
from monitoring.monitor import Monitor
from monitoring.records import AlertRecord, MonitorRecord, decode_monitoring
from monitoring.runner import MonitorSummary, OffsetTracker, Watermarks
from monitoring.skew import SkewChecker, in_sample, sample_key
from monitoring.state import MonitorState
from tests.helpers.serving import START_MS, synthetic_training_set, trained_registry

VIEWS = {v.name: v for v in delivery_eta.views}


def num(value: object) -> float:
    assert isinstance(value, int | float)
    return float(value)


PERIOD_MS = 10_000
T0 = START_MS + 12 * 3_600_000  # a period boundary, 12:00 UTC


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    root: Path = tmp_path_factory.mktemp("models")
    registry = trained_registry(root, delivery_eta, versions=2)
    # Version 2 as a model saved before references existed.
    (root / "delivery_eta" / "2" / REFERENCE_FILE).unlink()
    return registry


@functools.cache
def training_frame() -> pd.DataFrame:
    """The training set of version 1 (trained_registry's seed) with its model's predictions."""
    import lightgbm as lgb

    from models.fit import to_matrix

    frame = synthetic_training_set(delivery_eta, seed=1)
    registry = trained_registry(Path(tempfile.mkdtemp()), delivery_eta)
    booster = lgb.Booster(model_str=registry.model_text("delivery_eta", 1))
    columns = [column for _, column in model_features(delivery_eta)]
    frame["predicted"] = booster.predict(to_matrix(frame, columns))
    return frame


def records_from_training(
    start_ms: int, n: int, *, version: int = 1, shift: float = 0.0, seed: int = 0
) -> list[PredictionRecord]:
    """Prediction records whose features are rows of the training set (no drift), with
    distance_km shifted by ``shift``."""
    frame = training_frame()
    rows = frame.sample(n, replace=True, random_state=seed).reset_index(drop=True)
    out = []
    for i, row in enumerate(rows.to_dict("records")):
        features: dict[str, Any] = {}
        for ref, column in model_features(delivery_eta):
            value = row[column]
            features[ref] = None if pd.isna(value) else float(value)
        features["order_request:distance_km"] += shift
        time_ms = start_ms + i * (PERIOD_MS // n)
        out.append(
            PredictionRecord(
                prediction_id=f"p{start_ms}-{version}-{i}",
                time_ms=time_ms,
                model="delivery_eta",
                model_version=version,
                prediction=float(row["predicted"]) + shift * 100,
                latency_ms=2.0 + i % 5,
                request={"restaurant_id": row["restaurant_id"], "zone_id": row["zone_id"]},
                features=features,
                # Served rows: the window the contract asks for (E(t) for 1-minute slides).
                feature_ages_ms={
                    v.name: time_ms - (time_ms - 5_000) // v.slide_ms * v.slide_ms
                    for v in delivery_eta.views
                },
                missing=[],
                stale=[],
            )
        )
    return out


def make_monitor(
    registry: ModelRegistry, sink: list[Any], skew: SkewChecker | None = None, **settings: Any
) -> Monitor:
    s = load_settings(
        monitor_period_s=PERIOD_MS / 1000,
        monitor_min_rows=50,
        monitor_skew_sample=settings.pop("monitor_skew_sample", 0.0),
        **settings,
    )
    return Monitor(
        s,
        views=VIEWS,
        services={"delivery_eta": delivery_eta},
        registry=registry,
        sink=sink.append,
        skew=skew,
        clock=lambda: T0 / 1000,
    )


def test_fit_saves_a_reference_beside_the_metadata(registry: ModelRegistry):
    reference = registry.reference("delivery_eta", 1)
    assert reference is not None
    assert set(reference.features) == set(delivery_eta.feature_refs())
    assert reference.prediction is not None
    assert reference.prediction.count == reference.rows
    assert registry.reference("delivery_eta", 2) is None  # an older model: still readable
    assert registry.metadata("delivery_eta", 2).version == 2
    metadata = Path(registry.root, "delivery_eta", "1", "metadata.json").read_text()
    assert "sample" not in metadata  # the reference stays out of the metadata


def test_records_round_trip_and_name_bad_fields():
    record = MonitorRecord(
        check="drift",
        period_start_ms=0,
        period_end_ms=10,
        model="m",
        model_version=1,
        feature="v:f",
        rows=3,
        band="possible",
        values={"psi": 0.12, "decided_by": "psi"},
        at_ms=11,
    )
    assert decode_monitoring(record.encode()) == record
    assert MonitorRecord.decode(record.encode()).key == "drift/m/1//v:f@0"
    alert = AlertRecord(
        check="skew",
        period_start_ms=0,
        period_end_ms=10,
        band="drift",
        metric="mismatch_rate",
        value=0.5,
        threshold=0.05,
        message="m",
        at_ms=1,
    )
    assert AlertRecord.decode(alert.encode()) == alert
    with pytest.raises(RecordError, match="'period_start_ms'"):
        decode_monitoring(b'{"record": "monitor", "check": "x", "period_start_ms": "0"}')
    with pytest.raises(RecordError, match="newer than this Sluice reads"):
        decode_monitoring(b'{"record": "alert", "v": 9}')
    with pytest.raises(RecordError, match="'record'"):
        decode_monitoring(b'{"record": "other"}')


def test_drift_is_flagged_on_the_shifted_feature_only(registry: ModelRegistry):
    sink: list[Any] = []
    monitor = make_monitor(registry, sink)
    topic = "predictions"
    clean = records_from_training(T0, 400, seed=1)
    drifted = records_from_training(T0 + PERIOD_MS, 400, shift=6.0, seed=2)
    for record in clean + drifted:
        assert monitor.add_prediction(topic, record) is not None
    assert monitor.close(topic, T0 + PERIOD_MS) == [T0]
    first = [r for r in sink if isinstance(r, MonitorRecord) and r.check == "drift"]
    assert {r.band for r in first} == {"none"}, [(r.feature, r.values) for r in first]
    assert not [r for r in sink if isinstance(r, AlertRecord)]
    monitor.close_all(topic)
    alerts = [r for r in sink if isinstance(r, AlertRecord)]
    assert {(a.check, a.feature) for a in alerts} == {
        ("drift", "order_request:distance_km"),
        ("prediction_drift", None),
    }
    assert all(a.period_start_ms == T0 + PERIOD_MS for a in alerts)
    assert "order_request:distance_km" in alerts[0].message
    # A record for a closed period is late: counted and left out.
    assert monitor.add_prediction(topic, clean[0]) is None
    assert monitor.late == {topic: 1}
    serving = [r for r in sink if isinstance(r, MonitorRecord) and r.check == "serving"]
    assert serving[0].rows == 400
    assert serving[0].values["share_v1"] == 1.0
    assert serving[0].values["throughput_rps"] == pytest.approx(40.0)
    freshness = [r for r in sink if isinstance(r, MonitorRecord) and r.check == "freshness"]
    assert {r.view for r in freshness} == set(VIEWS)
    assert all(r.values["behind_rate"] == 0 and r.band == "none" for r in freshness)


def test_a_version_without_reference_says_so(registry: ModelRegistry):
    sink: list[Any] = []
    monitor = make_monitor(registry, sink)
    for record in records_from_training(T0, 100, version=2):
        monitor.add_prediction("predictions", record)
    monitor.close_all("predictions")
    drift = [r for r in sink if isinstance(r, MonitorRecord) and r.check == "drift"]
    assert drift
    assert {r.band for r in drift} == {"unknown"}
    assert {r.values["reference"] for r in drift} == {"none"}
    assert "no reference" in monitor.state.notes["delivery_eta v2"]


def test_freshness_counts_rows_behind_the_contract(registry: ModelRegistry):
    sink: list[Any] = []
    monitor = make_monitor(registry, sink)
    t = T0 + 7_000  # E(t) = T0 for 1-minute slides with 5 s lateness
    base = records_from_training(T0, 4)
    for i, record in enumerate(base):
        record.time_ms = t
        record.feature_ages_ms["restaurant_orders"] = 7_000 + (60_000 if i < 2 else 0)
        if i == 1:  # an older closing row: exact, not behind
            for spec in restaurant_orders.features():
                value = 0 if spec.function.value.startswith("count") else None
                record.features[f"restaurant_orders:{spec.name}"] = value
            record.features["restaurant_orders:sum_items_15m"] = 0.0
        record.feature_ages_ms["zone_couriers"] = None if i == 3 else 7_000
        monitor.add_prediction("predictions", record)
    monitor.close_all("predictions")
    fresh = {r.view: r for r in sink if isinstance(r, MonitorRecord) and r.check == "freshness"}
    assert fresh["restaurant_orders"].values["behind_rate"] == 0.25
    assert fresh["restaurant_orders"].values["behind_lag_p95_s"] == pytest.approx(60.0)
    assert fresh["restaurant_orders"].band == "drift"  # 25% behind
    assert fresh["zone_couriers"].values["missing_rate"] == 0.25
    assert fresh["zone_couriers"].values["behind_rate"] == 0


def test_stream_freshness_from_feature_rows(registry: ModelRegistry):
    sink: list[Any] = []
    monitor = make_monitor(registry, sink)
    topic = f"features.{zone_couriers.name}"
    for delay in (500, 900, 6_000):  # lateness 5 s: the last left after its servable time
        row = FeatureRow("zone_couriers", "z1", T0, {}, T0 + delay)
        assert monitor.add_feature_row(topic, row) == T0
    monitor.close_all(topic)
    record, alert = sink
    assert record.check == "stream_freshness"
    assert isinstance(alert, AlertRecord)
    assert alert.metric == "late_rate"
    assert record.values["late_rate"] == pytest.approx(1 / 3)
    assert record.values["delay_p50_s"] == pytest.approx(0.9)


def test_feedback_joins_in_either_order_once_and_live_mae_is_by_version(registry: ModelRegistry):
    sink: list[Any] = []
    monitor = make_monitor(registry, sink)
    predictions = records_from_training(T0, 40)
    for record in predictions[:30]:
        monitor.add_prediction("predictions", record)
    labels = {}
    for i, record in enumerate(predictions):
        label = record.prediction + (10 if i % 2 else -30)
        labels[record.prediction_id] = label
        feedback = FeedbackRecord(record.prediction_id, label, T0 + 1_000)
        assert monitor.add_feedback("feedback", feedback) == T0
    assert monitor.join.pending == 10  # their predictions come later
    for record in predictions[30:]:
        monitor.add_prediction("predictions", record)
    assert monitor.join.pending == 0
    again = FeedbackRecord(predictions[0].prediction_id, 0.0, T0 + 2_000)
    monitor.add_feedback("feedback", again)
    assert monitor.join.duplicates == 1
    monitor.close_all("feedback")
    (record,) = [r for r in sink if r.check == "live_error"]
    assert record.rows == 40
    assert record.values["mae"] == pytest.approx(20.0)
    assert record.values["mean_error"] == pytest.approx(-10.0)
    training = registry.metadata("delivery_eta", 1).metrics.mae
    assert record.values["mae_ratio"] == pytest.approx(20.0 / training)
    totals = monitor.join.totals[("delivery_eta", 1)]
    assert totals.labels == 40
    assert totals.mae == pytest.approx(20.0)


def test_feedback_join_keeps_a_bounded_memory():
    join = FeedbackJoin(max_predictions=3, max_pending=2)
    for i in range(3):
        assert join.on_feedback(FeedbackRecord(f"x{i}", 1.0, 0)) is None
    assert join.pending == 2
    assert join.unmatched_dropped == 1
    # Server-matched feedback needs no prediction record.
    matched = join.on_feedback(FeedbackRecord("y", 5.0, 0, "m", 3, 2.0))
    assert matched is not None
    assert (matched.version, matched.error) == (3, 3.0)


def test_skew_sample_is_reproducible_and_the_comparison_finds_the_wrong_entities(
    registry: ModelRegistry,
):
    keys = [
        sample_key(delivery_eta, {"restaurant_id": f"r{i}", "zone_id": "z1"}) for i in range(400)
    ]
    assert keys[0] == "restaurant_id=r0,zone_id=z1"
    picked = [k for k in keys if in_sample(k, 0.25)]
    assert picked == [k for k in keys if in_sample(k, 0.25)]  # the same every time
    assert 60 < len(picked) < 140
    assert all(in_sample(k, 1.0) for k in keys)
    assert not any(in_sample(k, 0.0) for k in keys)

    def offline(service: Any, rows: Any) -> dict[str, dict[str, Any]]:
        out = {}
        for row in rows:
            values = dict(row.features)
            if row.entities["restaurant_id"] == "r001":
                values["restaurant_orders:count_1h"] = (
                    values["restaurant_orders:count_1h"] or 0
                ) + 1
            out[row.prediction_id] = values
        return out

    checker = SkewChecker(offline)
    sink: list[Any] = []
    monitor = make_monitor(registry, sink, checker, monitor_skew_sample=1.0)
    records = records_from_training(T0, 200)
    for record in records:
        monitor.add_prediction("predictions", record)
    assert monitor.close_all("predictions") == []  # held until the skew result is written
    released: list[tuple[str, int]] = []
    for _ in range(200):
        released += monitor.poll()
        if released:
            break
        import time

        time.sleep(0.02)
    checker.close()
    assert released == [("predictions", T0)]
    (skew,) = [r for r in sink if isinstance(r, MonitorRecord) and r.check == "skew"]
    wrong = sum(r.request["restaurant_id"] == "r001" for r in records)
    assert wrong > 0
    assert skew.items == ["restaurant_orders:r001"]
    assert skew.values["mismatched_rows"] == wrong
    assert skew.values["mismatch:restaurant_orders:count_1h"] == wrong
    assert skew.values["mismatch:zone_couriers:mean_speed_kmh_5m"] == 0
    assert num(skew.values["smape:restaurant_orders:count_1h"]) > 0


def test_offsets_are_committed_below_open_periods_and_watermarks_skip_idle_partitions():
    offsets = OffsetTracker()
    offsets.read("p", 0, 10, 1000)
    offsets.read("p", 0, 11, 2000)
    offsets.read("p", 1, 5, 2000)
    offsets.read("f", 0, 7, None)
    assert offsets.commit_points() == {("p", 0): 10, ("p", 1): 5, ("f", 0): 8}
    offsets.release("p", 1000)
    assert offsets.commit_points()[("p", 0)] == 11
    offsets.release("p", 2000)
    assert offsets.commit_points() == {("p", 0): 12, ("p", 1): 6, ("f", 0): 8}

    marks = Watermarks()
    marks.see("p", 0, 5_000, now=100.0)
    marks.see("p", 1, 9_000, now=100.0)
    assert marks.watermark("p", 100.5) == 5_000
    marks.see("p", 1, 12_000, now=103.0)  # partition 0 has been quiet since 100
    assert marks.watermark("p", 103.0) == 12_000
    assert marks.watermark("q", 103.0) is None
    marks.assign("q", 0, now=103.0)  # assigned, nothing read yet: holds the others back
    marks.see("q", 1, 1_000, now=103.0)
    assert marks.watermark("q", 104.0) is None
    assert marks.watermark("q", 105.5) is None  # both quiet: nothing to go by
    marks.see("q", 1, 2_000, now=105.5)
    assert marks.watermark("q", 105.5) == 2_000


def test_the_dashboard_serves_the_page_its_data_and_metrics(registry: ModelRegistry):
    sink: list[Any] = []
    monitor = make_monitor(registry, sink)
    for record in records_from_training(T0, 200):
        monitor.add_prediction("predictions", record)
    monitor.close_all("predictions")
    with TestClient(create_dashboard(monitor.state, monitor.metrics)) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert "panel-" in page.text
        assert "<script>" in page.text
        assert "http" not in page.text.replace("http://www.w3.org/2000/svg", "")  # no CDN
        data = client.get("/api/summary").json()
        assert data["panels"]["latency"]["series"][0]["points"]
        assert data["panels"]["traffic"]["series"][0]["name"] == "delivery_eta v1"
        assert len(data["drift"]) == len(delivery_eta.feature_refs()) + 1
        assert data["panels"]["cache"]["note"] is None  # no scraper: set by the runner
        metrics = client.get("/metrics").text
        assert 'sluice_monitor_drift{feature="order_request:distance_km"' in metrics


def test_the_summary_fits_80_columns(registry: ModelRegistry):
    sink: list[Any] = []
    monitor = make_monitor(registry, sink)
    for record in records_from_training(T0, 200, shift=6.0):
        monitor.add_prediction("predictions", record)
    monitor.close_all("predictions")
    summary = MonitorSummary(
        consumed={"predictions": 200},
        late={},
        invalid={},
        written=monitor.written,
        alerts=monitor.alerts_raised,
        latest=monitor.state.latest(),
        mae={},
        notes={},
    )
    out = io.StringIO()
    print_summary(Console(file=out, width=80), summary)
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "order_request:distance_km" in text
    assert "none: 12 features" in text


def test_state_snapshot_is_json_ready():
    state = MonitorState(5.0)
    state.add(
        MonitorRecord(
            check="skew",
            period_start_ms=0,
            period_end_ms=5_000,
            model="m",
            model_version=1,
            band="none",
            values={"mismatch_rate": np.float64(0.0).item()},
            at_ms=1,
        )
    )
    snapshot = state.snapshot()
    assert snapshot["panels"]["skew"]["series"] == [{"name": "m v1", "points": [[5000, 0.0]]}]


def test_cache_hit_rate_is_read_from_the_predictors_metrics(monkeypatch: pytest.MonkeyPatch):
    import httpx

    from monitoring.traffic import CacheScraper

    pages = iter(
        [
            "sluice_requests_total 5\n",
            "# TYPE sluice_cache_lookups counter\n"
            'sluice_cache_lookups_total{outcome="hit"} 30\n'
            'sluice_cache_lookups_total{outcome="miss"} 10\n',
            "# TYPE sluice_cache_lookups counter\n"
            'sluice_cache_lookups_total{outcome="hit"} 39\n'
            'sluice_cache_lookups_total{outcome="miss"} 11\n',
        ]
    )
    monkeypatch.setattr(httpx, "get", lambda url, timeout: httpx.Response(200, text=next(pages)))
    assert CacheScraper(None).note is not None  # no address: a note, no rate
    scraper = CacheScraper("http://127.0.0.1:1")
    assert scraper.scrape(1) is None
    assert scraper.note is not None
    assert "no cache metrics" in scraper.note
    first = scraper.scrape(2)
    assert first is not None
    assert first.hit_rate == pytest.approx(0.75)
    second = scraper.scrape(3)  # since the previous reading: 9 hits, 1 miss
    assert second is not None
    assert second.hit_rate == pytest.approx(0.9)
    assert scraper.note is None


def test_closed_periods_survive_a_restart(tmp_path: Path):
    from monitoring.runner import load_closed, save_closed

    settings = load_settings(state_dir=tmp_path, monitor_group="g1")
    assert load_closed(settings) == {}
    save_closed(settings, {"sluice.predictions": 1_000})
    assert load_closed(settings) == {"sluice.predictions": 1_000}
    (tmp_path / "monitor" / "g1.json").write_text("not json")
    assert load_closed(settings) == {}  # unreadable: start afresh, with a warning
