"""The empty placeholder file of a view without offline rows (feature_repo/offline.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from examples.delivery.features import restaurant_orders, restaurant_prep
from feature_repo.offline import offline_arrow_schema, placeholder_path, settle_placeholder


def test_written_while_empty_and_removed_once_rows_arrive(tmp_path: Path):
    view_dir = tmp_path / restaurant_prep.name
    assert settle_placeholder(view_dir, restaurant_prep)
    placeholder = placeholder_path(view_dir)
    table = pq.read_table(placeholder)
    assert table.num_rows == 0
    assert table.schema == offline_arrow_schema(restaurant_prep)
    assert settle_placeholder(view_dir, restaurant_prep), "idempotent"
    assert [p.name for p in view_dir.rglob("*")] == [placeholder.parent.name, placeholder.name]

    day = view_dir / "date=2026-11-23"
    day.mkdir()
    pq.write_table(offline_arrow_schema(restaurant_prep).empty_table(), day / "part-00000.parquet")
    assert not settle_placeholder(view_dir, restaurant_prep)
    assert not placeholder.parent.exists()

    (day / "part-00000.parquet").unlink()
    assert settle_placeholder(view_dir, restaurant_prep), "back when the rows are gone"


def test_schema_names_the_store_columns_in_order():
    names = offline_arrow_schema(restaurant_orders).names
    assert names[:4] == [
        "restaurant_id",
        "event_timestamp",
        "servable_timestamp",
        "created_timestamp",
    ]
    assert names[4:] == [spec.name for spec in restaurant_orders.features()]
