"""The predictor serves what training used: per row and view, the row the availability contract
(features/contract.py) picks at t among the store's newest and previous rows; event_time
replays; the serve_behind setting's three modes; metrics and the prediction log say which."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from core.errors import RecordError, SettingsError
from core.records import PredictionRecord
from core.settings import Settings, load_settings
from examples.delivery.features import (
    delivery_eta,
    restaurant_orders,
    restaurant_prep,
    zone_couriers,
)
from feature_repo.online_store import OnlineRow, empty_values, is_empty_row
from features.contract import RowStatus
from features.definitions import FeatureView
from features.schema import Field, FieldType
from models.registry import ModelRegistry
from serving.app import create_app
from serving.errors import ModelIncompatibleError
from serving.features import FeaturePlan, RowLookup, build_plan, join, read_rows
from serving.schemas import row_model
from tests.helpers.serving import FakeProducer, FakeReader, trained_registry

MIN = 60_000
LATE = 5_000  # the example views' lateness
# A minute boundary ten minutes ago: event times around it are valid replays.
E0 = int(time.time() * 1000) // MIN * MIN - 10 * MIN
E1 = E0 + MIN
PLAN = build_plan(delivery_eta, delivery_eta.feature_refs())
REQUEST = {"distance_km": 2.0, "hour_of_day": 12, "items": 2}
ROW = {"restaurant_id": "r1", "zone_id": "z1", **REQUEST}


def orders(count: int) -> dict[str, Any]:
    return {
        "count_5m": count,
        "count_15m": count + 1,
        "count_1h": count + 2,
        "sum_items_15m": 2.0 * count,
        "mean_subtotal_1h": 20.5,
    }


def closing(view: FeatureView) -> dict[str, Any]:
    return empty_values(view)


def lookup(newest: OnlineRow | None, progress: dict[str, int] | None = None) -> RowLookup:
    """Orders of r1 as given; zone and prep: old closing rows (exactly empty at any t)."""
    rows = RowLookup(progress)
    rows[("restaurant_orders", "r1")] = newest
    rows[("zone_couriers", "z1")] = OnlineRow("z1", E0 - 60 * MIN, closing(zone_couriers))
    rows[("restaurant_prep", "r1")] = OnlineRow("r1", E0 - 3 * 86_400_000, closing(restaurant_prep))
    return rows


def early_with_previous() -> OnlineRow:
    """The stream wrote E1 (servable at E1 + 5 s) and kept E0 as the previous row."""
    return OnlineRow("r1", E1, orders(7), OnlineRow("r1", E0, orders(3), empty=False), False)


def served(t_ms: int, newest: OnlineRow | None, mode: Any = "flag") -> Any:
    return join(PLAN, ROW, lookup(newest), now_ms=E1 + 30 * MIN, t_ms=t_ms, serve_behind=mode)


# --- the choice, row by row ---------------------------------------------------------------


def test_a_row_written_early_is_not_served_before_its_time_its_previous_row_is():
    joined = served(E1 + LATE - 1, early_with_previous())  # E(t) = E0
    assert joined.status["restaurant_orders"] is RowStatus.EXACT
    assert joined.window_ends_ms["restaurant_orders"] == E0
    assert joined.values["restaurant_orders:count_5m"] == 3
    assert joined.behind == []
    assert joined.as_of_ms == E1 + LATE - 1
    assert joined.ages_ms["restaurant_orders"] == E1 + 30 * MIN - E0  # now - end served


def test_once_servable_the_newest_row_is_served():
    joined = served(E1 + LATE, early_with_previous())
    assert (joined.status["restaurant_orders"], joined.window_ends_ms["restaurant_orders"]) == (
        RowStatus.EXACT,
        E1,
    )
    assert joined.values["restaurant_orders:count_5m"] == 7


def test_an_older_busy_row_is_behind_flagged_and_served_by_default():
    joined = served(E1 + MIN + LATE, early_with_previous())  # E(t) = E1 + 1 min: not written
    assert joined.status["restaurant_orders"] is RowStatus.BEHIND
    assert joined.behind == ["restaurant_orders"]
    assert joined.values["restaurant_orders:count_5m"] == 7
    assert joined.window_ends_ms["restaurant_orders"] == E1
    assert "restaurant_orders" not in joined.missing


def test_when_the_newest_is_early_and_the_previous_is_old_and_busy_it_is_behind():
    newest = OnlineRow("r1", E1, orders(7), OnlineRow("r1", E0 - 5 * MIN, orders(1)))
    joined = served(E1 + 1_000, newest)  # E(t) = E0, the previous row is older
    assert joined.status["restaurant_orders"] is RowStatus.BEHIND
    assert joined.window_ends_ms["restaurant_orders"] == E0 - 5 * MIN
    assert joined.values["restaurant_orders:count_5m"] == 1


def test_an_older_closing_row_is_exactly_the_empty_value_due():
    empty = closing(restaurant_orders)
    for flag in (True, None):  # stored flag, or computed from the values (a reader without it)
        joined = served(E1 + 10 * MIN, OnlineRow("r1", E0, empty, empty=flag))
        assert joined.status["restaurant_orders"] is RowStatus.EXACT
        assert joined.behind == []
        assert joined.values["restaurant_orders:count_5m"] == 0
        assert joined.values["restaurant_orders:mean_subtotal_1h"] is None
    # The previous slot's closing row counts as well when the newest is early.
    newest = OnlineRow("r1", E1, orders(7), OnlineRow("r1", E0 - 3 * MIN, empty))
    joined = served(E1 + 1_000, newest)
    assert (joined.status["restaurant_orders"], joined.window_ends_ms["restaurant_orders"]) == (
        RowStatus.EXACT,
        E0 - 3 * MIN,
    )


def test_no_row_or_only_a_first_row_not_servable_yet_is_missing_with_empty_values():
    for newest in (None, OnlineRow("r1", E1, orders(7))):
        joined = served(E1 + 1_000, newest)
        assert joined.status["restaurant_orders"] is RowStatus.MISSING
        assert "restaurant_orders" in joined.missing
        assert joined.window_ends_ms["restaurant_orders"] is None
        assert joined.ages_ms["restaurant_orders"] is None
        assert joined.values["restaurant_orders:count_5m"] == 0
    # Both kept rows are after E(t): nothing servable is kept (a replay too far back).
    joined = served(E0 + 1_000, early_with_previous())
    assert joined.status["restaurant_orders"] is RowStatus.MISSING


def test_below_the_streams_progress_a_missing_or_closing_row_is_behind_not_exact():
    t = E1 + 10 * MIN  # E(t) is well after E1
    empty = closing(restaurant_orders)
    for newest in (None, OnlineRow("r1", E0, empty, empty=True)):
        # The stream has finished only up to E1: the row of E(t) may not be written yet.
        joined = join(PLAN, ROW, lookup(newest, {"restaurant_orders": E1}), E1 + 30 * MIN, t)
        assert joined.status["restaurant_orders"] is RowStatus.BEHIND
        assert joined.behind == ["restaurant_orders"]
        assert "restaurant_orders" not in joined.missing
        assert joined.values["restaurant_orders:count_5m"] == 0  # the empty value, flagged
        # Past E(t), or no progress published: as before (missing / exact).
        for progress in ({"restaurant_orders": E1 + 30 * MIN}, {}):
            joined = join(PLAN, ROW, lookup(newest, progress), E1 + 30 * MIN, t)
            assert joined.status["restaurant_orders"] is not RowStatus.BEHIND
            assert joined.behind == []


def test_a_batch_reads_the_streams_progress_before_its_rows():
    reader = FakeReader()
    reader.progress = {"restaurant_orders": E1}
    lookup_read = read_rows(reader, [(PLAN, ROW)])
    assert reader.order == ["progress", "rows"]  # never a progress newer than the rows read
    assert lookup_read.progress == {"restaurant_orders": E1}


def test_serve_behind_empty_serves_the_views_empty_values_flagged():
    joined = served(E1 + MIN + LATE, early_with_previous(), mode="empty")
    assert joined.behind == ["restaurant_orders"]
    assert joined.values["restaurant_orders:count_5m"] == 0
    assert joined.values["restaurant_orders:mean_subtotal_1h"] is None
    assert joined.window_ends_ms["restaurant_orders"] is None
    assert "restaurant_orders" not in joined.missing  # a row exists; it is late


def test_without_t_the_row_is_served_at_now():
    joined = join(PLAN, ROW, lookup(early_with_previous()), now_ms=E1 + 1_000)
    assert joined.as_of_ms == E1 + 1_000
    assert joined.window_ends_ms["restaurant_orders"] == E0


def test_emptiness_follows_the_aggregations_empty_values():
    empties = empty_values(restaurant_orders)
    assert is_empty_row(empties, empties)
    assert is_empty_row(empties, empties | {"sum_items_15m": 0})  # 0 == 0.0
    assert not is_empty_row(empties, empties | {"count_1h": 1})
    assert not is_empty_row(empties, empties | {"mean_subtotal_1h": 0.0})
    assert not is_empty_row(empties, {k: None for k in empties})  # count null is not 0


def test_event_time_is_a_reserved_row_field():
    plan = FeaturePlan(
        delivery_eta, (), (), (Field(name="event_time", type=FieldType.INT),), empties={}
    )
    with pytest.raises(ModelIncompatibleError, match="event_time"):
        row_model(plan, "m")


# --- through the app ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return trained_registry(tmp_path_factory.mktemp("contract") / "models", delivery_eta)


@pytest.fixture
def reader() -> FakeReader:
    reader = FakeReader()
    reader.put(restaurant_orders, "r1", E1, orders(7), previous=(E0, orders(3)))
    reader.put(zone_couriers, "z1", E0 - 60 * MIN, closing(zone_couriers))
    reader.put(restaurant_prep, "r1", E0 - 3 * 86_400_000, closing(restaurant_prep))
    return reader


def app_client(
    registry: ModelRegistry, reader: FakeReader, producer: FakeProducer, **settings: Any
) -> TestClient:
    config = load_settings(models_dir=str(registry.root), serve_models=["delivery_eta"], **settings)
    return TestClient(create_app(config, reader=reader, registry=registry, producer=producer))


@pytest.fixture
def producer() -> FakeProducer:
    return FakeProducer()


@pytest.fixture
def client(registry, reader, producer) -> Iterator[TestClient]:
    with app_client(registry, reader, producer) as client:
        yield client


def predict(client: TestClient, **row: Any) -> dict[str, Any]:
    answer = client.post("/predict", json={"rows": [ROW | row], "return_features": True})
    assert answer.status_code == 200, answer.text
    prediction: dict[str, Any] = answer.json()["predictions"][0]
    return prediction


def iso(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat()


def test_replays_with_event_time_serve_the_row_due_then(client):
    before = predict(client, event_time=E1 + LATE - 1)
    assert before["window_ends_ms"]["restaurant_orders"] == E0
    assert before["features"]["restaurant_orders:count_5m"] == 3
    assert before["behind"] == []
    at = predict(client, event_time=iso(E1 + LATE))  # ISO-8601 with a timezone works alike
    assert at["window_ends_ms"]["restaurant_orders"] == E1
    assert at["features"]["restaurant_orders:count_5m"] == 7
    # Without event_time, t is the arrival: ten minutes on, the stream is behind.
    now = predict(client)
    assert now["behind"] == ["restaurant_orders"]
    assert now["features"]["restaurant_orders:count_5m"] == 7
    assert set(now["window_ends_ms"]) == {"restaurant_orders", "zone_couriers", "restaurant_prep"}
    assert 0 <= time.time() * 1000 - E1 - now["feature_ages_ms"]["restaurant_orders"] < 10_000
    metrics = client.get("/metrics").text
    assert 'sluice_contract_rows_total{status="exact",view="restaurant_orders"} 2.0' in metrics
    assert 'sluice_contract_rows_total{status="behind",view="restaurant_orders"} 1.0' in metrics
    assert 'sluice_contract_rows_total{status="exact",view="zone_couriers"} 3.0' in metrics


@pytest.mark.parametrize(
    ("event_time", "reason"),
    [
        ("2026-01-01T00:00:00", "no timezone"),
        ("yesterday", "not an ISO-8601 timestamp"),
        (True, "expected epoch milliseconds"),
        (1.5e12 + 0.5, "expected epoch milliseconds"),
        (12, "outside"),
        (4_102_444_800_000, "2100-01-01"),
        ("2100-01-01T00:00:00Z", "2100-01-01"),
    ],
)
def test_a_bad_event_time_is_a_422_naming_the_field(client, event_time, reason):
    answer = client.post("/predict", json={"rows": [ROW, ROW | {"event_time": event_time}]})
    assert answer.status_code == 422
    assert answer.json()["error"] == "invalid_request"
    problems = answer.json()["detail"]
    assert [p["field"] for p in problems] == ["rows[1].event_time"]
    assert reason in problems[0]["reason"], problems


def test_event_time_and_the_new_answer_fields_are_in_the_openapi_schema(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    (alternative,) = schemas["PredictRequest"]["oneOf"]  # one per served model
    rows = alternative["properties"]["rows"]
    assert "event_time" in rows["items"]["properties"]
    assert "event_time" not in rows["items"]["required"]
    assert "ISO-8601" in rows["items"]["properties"]["event_time"]["description"]
    answer = schemas["RowPrediction"]["properties"]
    assert {"window_ends_ms", "behind", "feature_ages_ms", "stale", "missing"} <= set(answer)
    assert "503" in spec["paths"]["/predict"]["post"]["responses"]


def test_the_prediction_log_carries_window_ends_statuses_and_t(registry, reader, producer):
    with app_client(registry, reader, producer) as client:
        first = predict(client, event_time=E1 + LATE - 1)
        predict(client)
    logged = [m.value() for m in producer.delivered if m.topic() == "sluice.predictions"]
    records = {r.prediction_id: r for r in map(PredictionRecord.decode, logged)}
    assert len(records) == 2
    record = records[first["prediction_id"]]
    assert record.as_of_ms == E1 + LATE - 1
    assert record.window_ends_ms == first["window_ends_ms"]
    assert record.row_status == {
        "restaurant_orders": "exact",
        "zone_couriers": "exact",
        "restaurant_prep": "exact",
    }
    assert "event_time" not in record.request  # the row's features only; t is as_of_ms
    (other,) = (r for r in records.values() if r is not record)
    assert other.row_status is not None
    assert other.row_status["restaurant_orders"] == "behind"


def test_serve_behind_empty_through_the_app(registry, reader, producer):
    with app_client(registry, reader, producer, serve_behind="empty") as client:
        got = predict(client)
    assert got["behind"] == ["restaurant_orders"]
    assert got["features"]["restaurant_orders:count_5m"] == 0
    assert got["window_ends_ms"]["restaurant_orders"] is None


def test_serve_behind_reject_is_a_503_naming_the_views(registry, reader, producer):
    with app_client(registry, reader, producer, serve_behind="reject") as client:
        rows = [ROW | {"event_time": E1 + LATE}, ROW]  # the first is exact, the second behind
        answer = client.post("/predict", json={"rows": rows})
        assert answer.status_code == 503
        body = answer.json()
        assert body["error"] == "features_behind"
        assert body["views"] == ["restaurant_orders"]
        assert body["rows"] == [{"row": 1, "views": ["restaurant_orders"]}]
        assert "restaurant_orders" in body["detail"]
        ok = client.post("/predict", json={"rows": rows[:1]})
        assert ok.status_code == 200
        metrics = client.get("/metrics").text
        assert 'sluice_contract_rows_total{status="behind",view="restaurant_orders"} 1.0' in metrics
    logged = [m for m in producer.delivered if m.topic() == "sluice.predictions"]
    assert len(logged) == 1  # the rejected request logged nothing


def test_the_setting_takes_three_values_and_names_itself_otherwise():
    assert load_settings().serve_behind == "flag"
    assert Settings(serve_behind="reject").serve_behind == "reject"
    with pytest.raises(SettingsError, match=r"serve_behind: .*expected flag, empty or reject"):
        load_settings(serve_behind="drop")


# --- the record -----------------------------------------------------------------------------

RECORD = PredictionRecord(
    prediction_id="p1",
    time_ms=E1 + 30_000,
    model="delivery_eta",
    model_version=1,
    prediction=1200.0,
    latency_ms=1.5,
    request={"restaurant_id": "r1"},
    features={"restaurant_orders:count_5m": 3},
    feature_ages_ms={"restaurant_orders": 90_000, "zone_couriers": None},
    missing=["zone_couriers"],
    stale=[],
    window_ends_ms={"restaurant_orders": E0, "zone_couriers": None},
    row_status={"restaurant_orders": "exact", "zone_couriers": "missing"},
    as_of_ms=E1 + 4_000,
)


def test_prediction_records_round_trip_the_contract_fields_and_older_ones_still_decode():
    assert PredictionRecord.decode(RECORD.encode()) == RECORD
    older = orjson.loads(RECORD.encode())
    for name in ("window_ends_ms", "row_status", "as_of_ms"):
        del older[name]
    decoded = PredictionRecord.decode(orjson.dumps(older))
    assert (decoded.window_ends_ms, decoded.row_status, decoded.as_of_ms) == (None, None, None)
    assert decoded.prediction_id == "p1"
    bad = orjson.loads(RECORD.encode()) | {"row_status": {"zone_couriers": 3}}
    with pytest.raises(RecordError, match=r"row_status\.zone_couriers"):
        PredictionRecord.decode(orjson.dumps(bad))
