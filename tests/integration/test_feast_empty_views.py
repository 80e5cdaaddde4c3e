"""A view without offline rows yet (just applied, or a daily view whose first window has not
closed) is readable through Feast's SDK: applying the definitions leaves an empty file with the
store's schema in its offline directory (feature_repo/offline.py), which goes once rows arrive.
Without it, Feast 0.67's get_historical_features fails for the whole request (dask: "No files
satisfy the parquet_file_extension criteria")."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.settings import Settings
from examples.delivery.features import restaurant_orders, restaurant_prep
from feature_repo.config import feature_store
from feature_repo.offline import offline_arrow_schema, placeholder_path, settle_placeholder
from features.contract import servable_at_ms
from features.registry import load_registry
from tests.helpers.feast import feast_settings

pytestmark = pytest.mark.integration
END = int(datetime(2026, 11, 23, 21, 0, tzinfo=UTC).timestamp() * 1000)
KEYS = ["r1", "r2", "r3"]


def stamp(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def write_rows(settings: Settings) -> dict[str, int]:
    """One restaurant_orders row per key, ending at END (the count differs by key)."""
    schema = offline_arrow_schema(restaurant_orders)
    counts = {key: 3 + i for i, key in enumerate(KEYS)}
    columns: dict[str, list[object]] = {name: [] for name in schema.names}
    for key, count in counts.items():
        columns["restaurant_id"].append(key)
        columns["event_timestamp"].append(stamp(END))
        columns["servable_timestamp"].append(stamp(servable_at_ms(restaurant_orders, END)))
        columns["created_timestamp"].append(stamp(END))
        for spec in restaurant_orders.features():
            columns[spec.name].append(count if spec.name.startswith("count") else None)
    directory = settings.offline_store_dir / restaurant_orders.name / "date=2026-11-23"
    directory.mkdir(parents=True)
    pq.write_table(pa.table(columns, schema=schema), directory / "part-00000.parquet")
    # What batch/offline_store.write_offline does after a write.
    assert not settle_placeholder(directory.parent, restaurant_orders)
    return counts


def test_views_without_rows_are_readable_through_feast(stack_settings: Settings, tmp_path: Path):
    settings = feast_settings(stack_settings, tmp_path, "empty_views")
    views = list(load_registry(settings.definitions_module).views.values())
    for view in views:
        placeholder = placeholder_path(settings.offline_store_dir / view.name)
        assert pq.read_table(placeholder).schema == offline_arrow_schema(view), view.name
    counts = write_rows(settings)
    orders_dir = settings.offline_store_dir / restaurant_orders.name
    assert not placeholder_path(orders_dir).exists(), "gone once the view has rows"

    store = feature_store(settings)
    at = servable_at_ms(restaurant_orders, END) + 1000
    entity_df = pd.DataFrame(
        {
            "restaurant_id": KEYS,
            "event_timestamp": pd.to_datetime([at] * len(KEYS), unit="ms", utc=True),
        }
    )
    counter = next(s.name for s in restaurant_orders.features() if s.name.startswith("count"))
    prep = [f"{restaurant_prep.name}:{s.name}" for s in restaurant_prep.features()]
    refs = [f"{restaurant_orders.name}:{counter}", *prep]
    result = store.get_historical_features(entity_df=entity_df, features=refs).to_df()
    assert sorted(result["restaurant_id"]) == KEYS, "every label row comes back"
    for record in result.to_dict("records"):
        assert record[counter] == counts[record["restaurant_id"]]
        assert all(pd.isna(record[s.name]) for s in restaurant_prep.features()), record
    # A view of only empty partitions alone.
    alone = store.get_historical_features(entity_df=entity_df, features=prep).to_df()
    assert len(alone) == len(KEYS)
    print(f"{len(views)} views applied, each readable; {len(result)} label rows joined")

    # Why: without the file, Feast's file store fails on the empty view (the whole request).
    prep_placeholder = placeholder_path(settings.offline_store_dir / restaurant_prep.name)
    prep_placeholder.unlink()
    with pytest.raises(ValueError, match="parquet_file_extension"):
        store.get_historical_features(entity_df=entity_df, features=refs).to_df()
