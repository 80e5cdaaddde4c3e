"""The Spark engine against the pure-Python reference, and the batch jobs built on it.

compile_view must return exactly reference.with_closing_rows(reference.compute_view(...)) for
every example view and for a synthetic view using every aggregation, a derived column and a
filter, on hand-built edge cases (events on window boundaries, ties in event time, nulls,
division by zero, empty windows between bursts, large means with small spreads) and random
events, fed out of time order. Then: backfills are idempotent, incremental runs continue from
the recorded state without rewriting older days, materialization pushes the closed-window value
of each entity, and training sets equal reference.value_at for random label rows.
One Spark session serves the whole module; data is small (a few thousand events).
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from batch.backfill import BackfillReport, backfill
from batch.compile import compile_view
from batch.errors import EventSchemaError, UnsupportedAggregationError
from batch.offline_store import (
    CREATED_TIMESTAMP,
    load_state,
    offline_columns,
    read_offline,
    write_offline,
)
from batch.training import feature_column, training_set
from core.settings import Settings, load_settings
from events.history import SourceEvent, write_history
from examples.delivery.features import (
    VIEWS,
    delivery_eta,
    restaurant_orders,
    zone_couriers,
)
from examples.delivery.simulate import CityConfig, DeliverySimulator
from examples.delivery.sources import SOURCES
from features.definitions import Aggregation, AggregationFunction, Entity, FeatureView, Window
from features.reference import RowKey, compute_view, value_at, with_closing_rows
from features.schema import EventSource, Field, FieldType
from tests.helpers.spark import EPOCH, Rows, canonical, frame, spark_rows, to_datetime, to_ms

pytestmark = [pytest.mark.integration, pytest.mark.spark]

Agg = AggregationFunction
SECOND, MINUTE, HOUR, DAY = 1000, 60_000, 3_600_000, 86_400_000
DAY0 = date(2026, 11, 10)
DAY0_MS = (datetime.combine(DAY0, datetime.min.time(), UTC) - EPOCH) // timedelta(milliseconds=1)
# A small city: about 5,000 events a day over the three sources.
TINY_CITY = CityConfig(
    n_restaurants=40, n_couriers=8, peak_orders_per_minute=3, ping_interval_s=300
)
# Long after the history: every window in it is closed.
LATER = datetime.combine(DAY0 + timedelta(days=30), datetime.min.time(), UTC)

PURCHASES = EventSource(
    name="purchases",
    key_field="user_id",
    event_time_field="ts",
    fields=(
        Field(name="user_id", type=FieldType.STRING),
        Field(name="amount", type=FieldType.FLOAT, nullable=True),
        Field(name="qty", type=FieldType.INT),
        Field(name="label", type=FieldType.STRING, nullable=True),
        Field(name="flag", type=FieldType.BOOL),
        Field(name="ts", type=FieldType.TIMESTAMP),
    ),
)
W1, W3, W10 = (Window.sliding(size, every="1m") for size in ("1m", "3m", "10m"))
ALL_AGGREGATIONS = FeatureView(
    name="purchases_all",
    entity=Entity(name="user", join_key="user_id"),
    source=PURCHASES,
    derived={"unit_price": "amount / qty", "weight": "qty * 2 + 1"},
    filter="qty >= 0 and coalesce(label, 'none') != 'skip'",
    aggregations=(
        Aggregation(function=Agg.COUNT, windows=(W1, W3, W10)),
        Aggregation(function=Agg.SUM, column="amount", windows=(W1, W3, W10)),
        Aggregation(function=Agg.MEAN, column="unit_price", windows=(W3, W10)),
        Aggregation(function=Agg.MIN, column="unit_price", windows=(W10,)),
        Aggregation(function=Agg.MAX, column="weight", windows=(W1, W10)),
        Aggregation(function=Agg.LAST, column="label", windows=(W1, W10)),
        Aggregation(function=Agg.LAST, column="qty", windows=(W3,)),
        Aggregation(function=Agg.LAST, column="amount", windows=(W10,)),
        Aggregation(function=Agg.LAST, column="flag", windows=(W10,)),
        Aggregation(function=Agg.STDDEV, column="amount", windows=(W3, W10)),
        Aggregation(function=Agg.COUNT_DISTINCT, column="label", windows=(W10,)),
    ),
)
assert {a.function for a in ALL_AGGREGATIONS.aggregations} == set(Agg)


# --- helpers --------------------------------------------------------------------------------


def arrow_rows(view: FeatureView, table: pa.Table) -> Rows:
    names = [s.name for s in view.features()]
    key = view.entity.join_key
    out: Rows = {}
    stamps = table["event_timestamp"].cast(pa.int64()).to_pylist()  # micros
    columns = {n: table[n].to_pylist() for n in names}
    for i, entity in enumerate(table[key].to_pylist()):
        row_key = (entity, stamps[i] // 1000)
        assert row_key not in out, f"duplicate row {row_key}"
        out[row_key] = {n: columns[n][i] for n in names}
    return out


def same(want: Any, have: Any, dtype: FieldType) -> bool:
    if want is None or have is None:
        return want is None and have is None
    if dtype is FieldType.FLOAT:
        # 1e-9 relative; the absolute floor covers a stddev of equal values (0 vs ~1e-17).
        return isinstance(have, float) and math.isclose(want, have, rel_tol=1e-9, abs_tol=1e-12)
    return type(have) is type(want) and have == want


def assert_same_rows(view: FeatureView, expected: Mapping[RowKey, Any], got: Rows) -> None:
    missing, extra = expected.keys() - got.keys(), got.keys() - expected.keys()
    assert not missing, f"{view.name}: {len(missing)} rows missing, e.g. {sorted(missing)[:3]}"
    assert not extra, f"{view.name}: {len(extra)} rows too many, e.g. {sorted(extra)[:3]}"
    dtypes = {s.name: s.dtype for s in view.features()}
    bad = [
        (row_key, name, want, got[row_key][name])
        for row_key, values in expected.items()
        for name, want in values.items()
        if not same(want, got[row_key][name], dtypes[name])
    ]
    assert not bad, f"{view.name}: {len(bad)} values differ, e.g. {bad[:5]}"


def reference_rows(view: FeatureView, events: Sequence[Mapping[str, Any]]) -> Rows:
    return with_closing_rows(view, compute_view(view, events))


def in_range(rows: Mapping[RowKey, Any], lo: int, hi: int) -> dict[RowKey, Any]:
    return {k: v for k, v in rows.items() if lo <= k[1] < hi}


def until(sim: DeliverySimulator, end_ms: int) -> list[SourceEvent]:
    events: list[SourceEvent] = []
    for event in sim.events():
        if event.event_time_ms >= end_ms:
            return events
        events.append(event)
    raise AssertionError("unreachable: the stream is endless")


# --- events ---------------------------------------------------------------------------------


def purchase(user: str, t: int, amount=1.0, qty=1, label="a", flag=False) -> dict[str, Any]:
    return {"user_id": user, "amount": amount, "qty": qty, "label": label, "flag": flag, "ts": t}


def edge_purchases() -> list[dict[str, Any]]:
    t0 = DAY0_MS + 12 * HOUR
    tie = t0 + 5 * MINUTE + 7
    events = [
        # u1: exactly on window boundaries (t = k * slide) and one millisecond before one.
        purchase("u1", t0, 2.0),
        purchase("u1", t0 + MINUTE, 3.0),
        purchase("u1", t0 + MINUTE - 1, 4.0, label="b"),
        purchase("u1", t0 + 3 * MINUTE, 5.0),
        purchase("u1", t0 + 10 * MINUTE, 6.0, label="c"),
        # u2: ties in event time: last takes the greatest value; nulls never win.
        purchase("u2", tie, 1.0, qty=3, label="b", flag=True),
        purchase("u2", tie, 9.0, qty=7, label="a", flag=False),
        purchase("u2", tie, None, qty=5, label=None, flag=True),
        purchase("u2", tie - 1, 99.0, qty=9, label="z", flag=False),
        # u3: only null amounts in a window (sum 0.0, mean/stddev null); qty 0 divides by zero.
        purchase("u3", t0, None, qty=2),
        purchase("u3", t0 + 20 * SECOND, None, qty=0),
        purchase("u3", t0 + 5 * MINUTE, 5.0, qty=0, label=None),
        # u5: filtered out entirely (negative qty, label 'skip'): no rows at all.
        purchase("u5", t0, qty=-1),
        purchase("u5", t0 + 1, label="skip"),
        # u7: equal values: stddev 0.
        *(purchase("u7", t0 + i * SECOND, 0.1) for i in range(3)),
    ]
    # u4: bursts with empty windows between them (gaps longer than the 10m window).
    for burst_minute in (0, 25, 26, 60):
        events += [
            purchase("u4", t0 + burst_minute * MINUTE + i * 7 * SECOND, float(i)) for i in range(4)
        ]
    # u6: a large mean with a small spread; sums of squares lose every digit here.
    events += [purchase("u6", t0 + i * 20 * SECOND, 1e6 + 0.001 * i) for i in range(9)]
    return events


def random_purchases(rng: random.Random, n: int) -> list[dict[str, Any]]:
    start = DAY0_MS + 13 * HOUR
    events = []
    for _ in range(n):
        # Times on a 10 s grid: ties happen. Bursty users leave windows empty in between.
        user = rng.choice(["r1", "r2", "r3", "r4"])
        t = start + rng.randrange(0, 3 * HOUR // (10 * SECOND)) * 10 * SECOND
        if user == "r4" and (t // (20 * MINUTE)) % 2:
            continue
        events.append(
            purchase(
                user,
                t,
                amount=None if rng.random() < 0.15 else round(rng.uniform(-50, 500), 2),
                qty=rng.randint(-1, 4),
                label=rng.choice([None, "a", "b", "c", "skip"]),
                flag=rng.random() < 0.5,
            )
        )
    return events


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> tuple[Path, dict[str, list[dict[str, Any]]]]:
    """Simulated history from DAY0 - 6 h to DAY0 + 2 d 8 h, written out of time order."""
    root = tmp_path_factory.mktemp("history")
    sim = DeliverySimulator(seed=21, start_ms=DAY0_MS - 6 * HOUR, city=TINY_CITY)
    events = until(sim, DAY0_MS + 2 * DAY + 8 * HOUR)
    random.Random(5).shuffle(events)  # late and out-of-order events in every partition
    write_history(events, root, SOURCES, batch_rows=500)
    by_source = {
        s.name: [canonical(s, e.payload) for e in events if e.source == s.name] for s in SOURCES
    }
    return root, by_source


@pytest.fixture(scope="module")
def references(history) -> dict[str, Rows]:
    _, events = history
    return {v.name: reference_rows(v, events[v.source.name]) for v in VIEWS}


@pytest.fixture(scope="module")
def store_settings(history, tmp_path_factory) -> Settings:
    root, _ = history
    offline = tmp_path_factory.mktemp("store") / "offline"
    return load_settings(history_dir=root, offline_store_dir=offline, spark_master="local[2]")


def run_backfill(spark, settings: Settings, views=VIEWS, **kwargs: Any) -> BackfillReport:
    options: dict[str, Any] = {"materialize": False, "show_progress": False, "chunk_days": 1}
    return backfill(settings, views, spark=spark, **(options | kwargs))


@pytest.fixture(scope="module")
def backfilled(spark, store_settings) -> tuple[BackfillReport, BackfillReport, dict[str, pa.Table]]:
    """The same two-day range backfilled twice, with the store's rows after each run."""
    end = DAY0 + timedelta(days=2)
    first = run_backfill(spark, store_settings, start=DAY0, end=end, now=LATER)
    snapshot = {v.name: read_offline("pyarrow", store_settings, v) for v in VIEWS}
    second = run_backfill(spark, store_settings, start=DAY0, end=end, now=LATER)
    return first, second, snapshot


# --- compile_view parity --------------------------------------------------------------------


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.name)
def test_delivery_views_match_reference(spark, history, references, view):
    _, events = history
    got = spark_rows(
        view, compile_view(spark, view, frame(spark, view.source, events[view.source.name]))
    )
    assert len(got) > 100
    assert_same_rows(view, references[view.name], got)


def test_every_aggregation_matches_reference_on_edge_cases(spark):
    events = edge_purchases() + random_purchases(random.Random(11), 2500)
    random.Random(3).shuffle(events)
    expected = reference_rows(ALL_AGGREGATIONS, events)
    df = compile_view(spark, ALL_AGGREGATIONS, frame(spark, PURCHASES, events))
    got = spark_rows(ALL_AGGREGATIONS, df)
    assert_same_rows(ALL_AGGREGATIONS, expected, got)

    # The cases are really there: spot checks of what the reference says.
    tie = DAY0_MS + 12 * HOUR + 6 * MINUTE
    assert got[("u2", tie)]["last_label_1m"] == "b"
    assert got[("u2", tie)]["last_amount_10m"] == 9.0
    assert got[("u2", tie)]["last_flag_10m"] is True
    assert got[("u3", DAY0_MS + 12 * HOUR + MINUTE)]["sum_amount_1m"] == 0.0
    assert got[("u3", DAY0_MS + 12 * HOUR + MINUTE)]["stddev_amount_3m"] is None
    assert not any(key == "u5" for key, _ in got)
    closing = got[("u4", DAY0_MS + 12 * HOUR + 11 * MINUTE)]
    assert closing["count_10m"] == 0
    assert closing["mean_unit_price_10m"] is None
    u6 = got[("u6", DAY0_MS + 12 * HOUR + 3 * MINUTE)]["stddev_amount_3m"]
    assert math.isclose(u6, expected[("u6", DAY0_MS + 12 * HOUR + 3 * MINUTE)]["stddev_amount_3m"])
    assert [df.schema[n].dataType.simpleString() for n in ("count_1m", "last_qty_3m")] == [
        "bigint",
        "bigint",
    ]
    assert df.schema["last_flag_10m"].dataType.simpleString() == "boolean"

    # Event time as epoch milliseconds (canonical JSON) gives the same rows.
    from_epoch = compile_view(spark, ALL_AGGREGATIONS, frame(spark, PURCHASES, events, epoch=True))
    assert_same_rows(ALL_AGGREGATIONS, expected, spark_rows(ALL_AGGREGATIONS, from_epoch))


def test_unsupported_aggregation_fails_before_running(spark, monkeypatch):
    import batch.compile as compile_module

    monkeypatch.delitem(compile_module._BUILDERS, Agg.STDDEV)
    events = frame(spark, PURCHASES, edge_purchases())
    with pytest.raises(UnsupportedAggregationError, match="stddev_amount_3m"):
        compile_view(spark, ALL_AGGREGATIONS, events)


def test_missing_event_column_is_a_typed_error(spark):
    events = frame(spark, PURCHASES, edge_purchases()).drop("qty")
    with pytest.raises(EventSchemaError, match="'qty'"):
        compile_view(spark, ALL_AGGREGATIONS, events)


# --- backfill, offline store, incremental runs ----------------------------------------------


def test_backfill_matches_reference_and_is_idempotent(backfilled, store_settings, references):
    first, second, snapshot = backfilled
    lo, hi = DAY0_MS, DAY0_MS + 2 * DAY
    for view in VIEWS:
        expected = in_range(references[view.name], lo, hi)
        table = read_offline("pyarrow", store_settings, view)
        assert table.column_names == offline_columns(view)
        assert table.schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
        assert table.schema.field(CREATED_TIMESTAMP).type == pa.timestamp("us", tz="UTC")
        assert_same_rows(view, expected, arrow_rows(view, table))  # no duplicates either
        before = snapshot[view.name].drop_columns([CREATED_TIMESTAMP])
        assert sorted(before.to_pylist(), key=repr) == sorted(
            table.drop_columns([CREATED_TIMESTAMP]).to_pylist(), key=repr
        )
        partitions = sorted(
            p.name for p in (store_settings.offline_store_dir / view.name).iterdir() if p.is_dir()
        )
        assert partitions == [f"date={DAY0}", f"date={DAY0 + timedelta(days=1)}"]
        assert first.rows_written[view.name] == second.rows_written[view.name] == len(expected)
    assert first.events_read > 0
    assert first.events_per_s > 0
    assert load_state(store_settings) == {v.name: hi for v in VIEWS}


def test_rewriting_a_range_drops_dates_that_lost_their_rows(spark, tmp_path):
    settings = load_settings(offline_store_dir=tmp_path / "offline")
    view = ALL_AGGREGATIONS
    day1, day2 = DAY0_MS + 12 * HOUR, DAY0_MS + DAY + 12 * HOUR
    both = [purchase("u1", day1), purchase("u1", day2)]
    days = [DAY0, DAY0 + timedelta(days=1)]
    assert (
        write_offline(
            settings, view, compile_view(spark, view, frame(spark, PURCHASES, both)), days
        )
        > 0
    )
    only_first = compile_view(spark, view, frame(spark, PURCHASES, both[:1]))
    written = write_offline(settings, view, only_first, days)
    assert written == len(reference_rows(view, both[:1]))
    assert sorted(
        p.name for p in (settings.offline_store_dir / view.name).iterdir() if p.is_dir()
    ) == [f"date={DAY0}"]


def test_incremental_continues_from_the_recorded_state(
    spark, backfilled, store_settings, references, tmp_path
):
    _, _, snapshot = backfilled
    settings = store_settings.model_copy(update={"offline_store_dir": tmp_path / "offline"})
    shutil.copytree(store_settings.offline_store_dir, settings.offline_store_dir)
    untouched = {v.name: read_offline("pyarrow", settings, v) for v in VIEWS}
    day2 = DAY0_MS + 2 * DAY
    for hours in (6.5, 8.5):
        now_ms = day2 + int(hours * HOUR) + 5 * SECOND
        before = load_state(settings)
        report = run_backfill(
            spark, settings, start=DAY0, incremental=True, now=to_datetime(now_ms)
        )
        state = load_state(settings)
        for view, view_report in zip(VIEWS, report.views, strict=True):
            bound = (now_ms // view.slide_ms + 1) * view.slide_ms  # ends <= now are closed
            # Restart at the day of the recorded point: a date partition is written whole.
            first = before[view.name] - before[view.name] % DAY
            assert (view_report.start_ms, view_report.end_ms) == (first, max(first, bound))
            assert state[view.name] == bound
            table = read_offline("pyarrow", settings, view)
            expected = in_range(references[view.name], DAY0_MS, bound)
            assert_same_rows(view, expected, arrow_rows(view, table))
            # Earlier days were not rewritten: same rows, same created_timestamp.
            old = read_offline("pyarrow", settings, view, to_datetime(DAY0_MS), to_datetime(day2))
            order = [(view.entity.join_key, "ascending"), ("event_timestamp", "ascending")]
            assert old.sort_by(order).equals(untouched[view.name].sort_by(order))
    assert snapshot  # the store copied above came from the idempotency runs


def test_materialize_pushes_each_entity_s_closed_window_value(
    spark, history, references, stack_settings, tmp_path
):
    from feature_repo.online_store import open_online_store

    root, events = history
    settings = stack_settings.model_copy(
        update={
            "history_dir": root,
            "offline_store_dir": tmp_path / "offline",
            "feast_project": "spark_parity",
            "feast_registry": tmp_path / "registry.db",
        }
    )
    now_ms = DAY0_MS + DAY + 13 * HOUR + 17 * MINUTE + 3 * SECOND
    views = [restaurant_orders, zone_couriers]
    day1 = DAY0 + timedelta(days=1)
    report = run_backfill(
        spark,
        settings,
        views,
        start=day1,
        end=day1 + timedelta(days=1),
        now=to_datetime(now_ms),
        materialize=True,
    )
    with open_online_store(settings) as store:
        for view, view_report in zip(views, report.views, strict=True):
            rows = references[view.name]
            keys = sorted({e[view.key_column] for e in events[view.source.name]})
            late = int(view.lateness.total_seconds() * 1000)
            pushed = {k for k, end in rows if DAY0_MS + DAY <= end <= now_ms - late}
            assert view_report.materialized == len(pushed) > 0
            for key, online in zip(keys, store.read(view, keys), strict=True):
                if key not in pushed:
                    assert online is None
                    continue
                assert online is not None
                assert online.window_end_ms <= now_ms
                want = value_at(view, rows, key, now_ms)
                for spec in view.features():
                    assert same(want[spec.name], online.values[spec.name], spec.dtype), (
                        key,
                        spec.name,
                    )
    # And Feast's own reader sees the same values (the acceptance check).
    from feature_repo.config import feature_store
    from feature_repo.registry_ops import apply
    from features.registry import load_registry

    apply(settings, load_registry(settings.definitions_module))
    fs = feature_store(settings)
    for view in views:
        rows = references[view.name]
        late = int(view.lateness.total_seconds() * 1000)
        pushed_keys = sorted({k for k, end in rows if DAY0_MS + DAY <= end <= now_ms - late})
        served = fs.get_online_features(
            features=[f"{view.name}:{spec.name}" for spec in view.features()],
            entity_rows=[{view.entity.join_key: key} for key in pushed_keys],
        ).to_dict()
        for index, key in enumerate(pushed_keys):
            want = value_at(view, rows, key, now_ms)
            for spec in view.features():
                assert same(want[spec.name], served[spec.name][index], spec.dtype), (key, spec)


# --- training sets --------------------------------------------------------------------------


def test_training_set_matches_value_at(spark, backfilled, store_settings, history, references):
    _, events = history
    rng = random.Random(17)
    restaurants = [*sorted({e["restaurant_id"] for e in events["orders"]}), "r-nobody"]
    zones = [*sorted({e["zone_id"] for e in events["courier_pings"]}), "z-nobody"]
    labels = []
    for i in range(400):
        t = DAY0_MS + rng.randrange(2 * DAY)
        if i % 50 == 0:
            t -= t % MINUTE  # exactly on a window end
        labels.append(
            (i, rng.choice(restaurants), rng.choice(zones), to_datetime(t), rng.uniform(600, 3600))
        )
    labels += labels[:3]  # identical label rows come back as many times as they were sent
    schema = (
        "label_id long, restaurant_id string, zone_id string, event_timestamp timestamp,"
        " delivery_seconds double"
    )
    df = training_set(spark, store_settings, delivery_eta, spark.createDataFrame(labels, schema))
    features = [feature_column(v.name, s.name) for v in delivery_eta.views for s in v.features()]
    assert df.columns == [
        "label_id",
        "restaurant_id",
        "zone_id",
        "event_timestamp",
        "delivery_seconds",
        *features,
    ]
    rows = df.collect()
    assert sorted(r["label_id"] for r in rows) == sorted(label[0] for label in labels)
    label_ms = {label[0]: to_ms(label[3]) for label in labels}
    filled = 0
    for row in rows:
        t = label_ms[row["label_id"]]
        for view in delivery_eta.views:
            want = value_at(view, references[view.name], row[view.entity.join_key], t)
            filled += want[view.features()[0].name] not in (0, None)
            for spec in view.features():
                have = row[feature_column(view.name, spec.name)]
                assert same(want[spec.name], have, spec.dtype), (row, spec.name, want[spec.name])
    assert filled > 100  # most label rows found real (non-empty) windows
