"""The offline-store contract gives closed-window values through Feast's point-in-time join.

Rows per the contract (reference.with_closing_rows: every non-empty window end, plus a closing
row of empty values after each run) are written as hive-partitioned parquet with pyarrow;
Feast's file store (get_historical_features) must then return reference.value_at for label rows
at random times, counts, means and nulls alike. A second test pins two limitations of Feast
0.67's file store that training-set code must work around.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.settings import Settings
from examples.delivery.features import restaurant_orders, restaurant_prep, zone_couriers
from feature_repo.config import feature_store
from features.contract import servable_at_ms
from features.definitions import FeatureView
from features.reference import RowKey, compute_view, current_window_end, value_at, with_closing_rows
from features.schema import FieldType
from tests.helpers.feast import feast_settings

pytestmark = pytest.mark.integration
MINUTE = 60_000
# 21:30 UTC: the rows cross midnight, so every view has two date partitions.
START = int(datetime(2026, 11, 23, 21, 30, tzinfo=UTC).timestamp() * 1000)
SPAN = 4 * 60 * MINUTE
ARROW = {FieldType.INT: pa.int64(), FieldType.FLOAT: pa.float64()}


def bursts(
    rng: random.Random, keys: list[str], make: Callable[[str, int], dict[str, Any]]
) -> list[dict[str, Any]]:
    """Bursts of events per key with gaps of 2 min to 2 h, so windows fill, thin out and empty."""
    events = []
    for key in keys:
        t = START + rng.randrange(30 * MINUTE)
        while t < START + SPAN:
            for _ in range(rng.choice([1, 1, 2, 5, 12])):
                events.append(make(key, t + rng.randrange(10 * MINUTE)))
            t += rng.choice([2, 8, 40, 75, 120]) * MINUTE
    return events


def order(rng: random.Random) -> Callable[[str, int], dict[str, Any]]:
    return lambda key, t: {
        "restaurant_id": key,
        "placed_at": t,
        "items": rng.randint(1, 6),
        "subtotal": round(rng.uniform(5, 80), 2),
    }


def ping(rng: random.Random) -> Callable[[str, int], dict[str, Any]]:
    return lambda key, t: {
        "zone_id": key,
        "pinged_at": t,
        "courier_id": f"c{rng.randrange(6)}",
        "speed_kmh": round(rng.uniform(0, 40), 1),
    }


def write_offline(view: FeatureView, rows: Mapping[RowKey, Mapping[str, Any]], root: Path) -> int:
    """<root>/<view>/date=YYYY-MM-DD/part-0.parquet, exactly as the contract says."""
    specs = view.features()
    by_date: dict[str, list[tuple[RowKey, Mapping[str, Any]]]] = defaultdict(list)
    for (key, end), values in sorted(rows.items()):
        by_date[datetime.fromtimestamp(end / 1000, tz=UTC).date().isoformat()].append(
            ((key, end), values)
        )
    created = datetime(2026, 12, 1, tzinfo=UTC)
    for day, items in by_date.items():
        directory = root / view.name / f"date={day}"
        directory.mkdir(parents=True)
        columns: dict[str, pa.Array] = {
            view.entity.join_key: pa.array([k for (k, _), _ in items], pa.string()),
            "event_timestamp": pa.array(
                [datetime.fromtimestamp(e / 1000, tz=UTC) for (_, e), _ in items],
                pa.timestamp("us", tz="UTC"),
            ),
            "servable_timestamp": pa.array(
                [
                    datetime.fromtimestamp(servable_at_ms(view, e) / 1000, tz=UTC)
                    for (_, e), _ in items
                ],
                pa.timestamp("us", tz="UTC"),
            ),
            "created_timestamp": pa.array([created] * len(items), pa.timestamp("us", tz="UTC")),
        }
        for spec in specs:
            columns[spec.name] = pa.array([v[spec.name] for _, v in items], ARROW[spec.dtype])
        pq.write_table(pa.table(columns), directory / "part-0.parquet")
    return len(by_date)


def served_within_ttl(view: FeatureView, ends: list[int], t: int) -> bool:
    """Feast joins only rows whose servable time lies in [t - ttl, t] (the limitations test)."""
    ttl = int(view.ttl.total_seconds() * 1000)
    return any(t - ttl <= servable_at_ms(view, end) <= t for end in ends)


def labels(
    view: FeatureView, rows: Mapping[RowKey, Any], rng: random.Random, n: int
) -> list[tuple[str, int]]:
    ends: dict[str, list[int]] = defaultdict(list)
    for key, end in rows:
        ends[key].append(end)
    out: list[tuple[str, int]] = []
    while len(out) < n:
        key = rng.choice(sorted(ends))
        t = START + rng.randrange(SPAN + 3 * 60 * MINUTE)
        if rng.random() < 0.2:
            # exactly at a servable time: inclusive
            t = servable_at_ms(view, current_window_end(t, view.slide_ms))
        if served_within_ttl(view, ends[key], t) and (key, t) not in out:
            out.append((key, t))
    return out


@pytest.fixture(scope="module")
def settings(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return feast_settings(stack_settings, tmp_path_factory.mktemp("pit"), "pit_test")


@pytest.fixture(scope="module")
def store(settings: Settings) -> Any:
    return feature_store(settings)


def same(a: Any, b: Any) -> bool:
    missing_a = a is None or (isinstance(a, float) and math.isnan(a))
    missing_b = b is None or (isinstance(b, float) and math.isnan(b))
    if missing_a or missing_b:
        return missing_a and missing_b
    return bool(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12))


@pytest.mark.parametrize(
    ("view", "make", "keys"),
    [
        (restaurant_orders, order, [f"r{i}" for i in range(6)]),
        (zone_couriers, ping, [f"z{i}" for i in range(4)]),
    ],
    ids=["restaurant_orders", "zone_couriers"],
)
def test_point_in_time_join_returns_closed_window_values(settings, store, view, make, keys):
    rng = random.Random(view.name)
    rows = compute_view(view, bursts(rng, keys, make(rng)))
    stored = with_closing_rows(view, rows)
    assert write_offline(view, stored, settings.offline_store_dir) == 2
    wanted = labels(view, stored, rng, 150)

    join_key = view.entity.join_key
    entity_df = pd.DataFrame(
        {
            join_key: [k for k, _ in wanted],
            "event_timestamp": pd.to_datetime([t for _, t in wanted], unit="ms", utc=True),
        }
    )
    refs = [f"{view.name}:{spec.name}" for spec in view.features()]
    result = store.get_historical_features(entity_df=entity_df, features=refs).to_df()
    assert len(result) == len(wanted)

    kinds: dict[str, int] = defaultdict(int)
    counter = next(s.name for s in view.features() if s.dtype is FieldType.INT)
    for record in result.to_dict("records"):
        t = int(record["event_timestamp"].timestamp() * 1000)
        expected = value_at(view, rows, record[join_key], t)
        for spec in view.features():
            got = record[spec.name]
            assert same(got, expected[spec.name]), (record[join_key], t, spec.name, got, expected)
            if spec.dtype is FieldType.INT:
                assert float(got).is_integer()
        kinds["empty" if expected[counter] == 0 else "busy"] += 1
        kinds["null"] += any(v is None for v in expected.values())
    # The sample covers busy windows, emptied ones (closing rows) and null means.
    assert kinds["busy"] > 20, kinds
    assert kinds["empty"] > 5, kinds
    assert kinds["null"] > 5, kinds


def test_feast_file_store_limitations_are_as_documented(settings, store):
    """Pins Feast 0.67 file-store behaviour that differs from closed-window semantics.

    1. A label row whose entity has rows, but none in [t - ttl, t], is dropped from the
       result instead of coming back with null features.
    2. A label row whose entity has no row at all can make the join fail when the source has
       more than one parquet file (dask cannot sort null timestamps across partitions).
    3. Identical label rows (same entity, same time) come back once.
    Training sets are built by Spark (batch/); anyone using Feast's file store directly must
    send only entities present in the view, unique rows, and expect rows outside ttl to vanish.
    """
    view = restaurant_prep  # daily slide, ttl 3 days: three rows make three date partitions
    day = 86_400_000
    first = START - START % day
    values = {"mean_prep_seconds_30d": 600.0, "mean_delivery_minutes_30d": 30.0, "count_30d": 4}
    rows = {("r1", first + i * day): values for i in range(3)}
    assert write_offline(view, rows, settings.offline_store_dir) == 3

    def join(keys: list[str], times: list[int]) -> Any:
        entity_df = pd.DataFrame(
            {"restaurant_id": keys, "event_timestamp": pd.to_datetime(times, unit="ms", utc=True)}
        )
        refs = [f"{view.name}:count_30d"]
        return store.get_historical_features(entity_df=entity_df, features=refs).to_df()

    inside = first + day + 3_600_000
    assert join(["r1"], [inside])["count_30d"].tolist() == [4]
    assert len(join(["r1", "r1"], [first - 5 * day, inside])) == 1  # 1: the early row vanished
    with pytest.raises(NotImplementedError, match="Divisions calculation failed"):
        join(["r1", "nobody"], [inside, inside])  # 2
    assert len(join(["r1", "r1"], [inside, inside])) == 1  # 3
