"""The offline store's files as Feast reads them: their Arrow schema, and a placeholder that
keeps a view's offline directory readable before its first rows exist.

Feast 0.67's file offline store hands a view's directory to dask, which raises ("No files
satisfy the parquet_file_extension criteria", or FileNotFoundError) when the directory holds no
parquet file yet: a view just applied, or a daily view whose first window has not closed. Then
``get_historical_features`` fails for every view it is asked for. So a view without rows gets
one empty file with the store's schema, in a partition of its own::

    <offline_store_dir>/<view>/date=1970-01-01/part-00000-empty.parquet

It holds no row, so every reader (Feast, Spark, pyarrow) reads the same rows as without it.
``settle_placeholder`` writes it when the directory has no other parquet file and removes it
once rows arrive (a second file would not change results, but Feast's file store is fragile
with several files: tests/integration/test_point_in_time.py). Feature registry applies and
offline writes (batch/offline_store.py) call it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.settings import Settings
from events.history import arrow_type
from features.definitions import FeatureView
from features.schema import FieldType

PLACEHOLDER_PARTITION = "date=1970-01-01"
PLACEHOLDER_FILE = "part-00000-empty.parquet"


def offline_arrow_schema(view: FeatureView) -> pa.Schema:
    """The store's files as pyarrow reads them (Spark writes timestamps as UTC micros): the
    entity join key, event, servable and created timestamps, then the features in order."""
    stamp = arrow_type(FieldType.TIMESTAMP, "us")
    return pa.schema(
        [
            pa.field(view.entity.join_key, pa.string()),
            pa.field("event_timestamp", stamp),
            pa.field("servable_timestamp", stamp),
            pa.field("created_timestamp", stamp),
            *(pa.field(spec.name, arrow_type(spec.dtype, "us")) for spec in view.features()),
        ]
    )


def placeholder_path(view_dir: Path) -> Path:
    return view_dir / PLACEHOLDER_PARTITION / PLACEHOLDER_FILE


def settle_placeholder(view_dir: Path, view: FeatureView) -> bool:
    """Write the empty placeholder file if ``view_dir`` holds no other parquet file, remove it
    if it does. Returns whether the placeholder is there afterwards."""
    placeholder = placeholder_path(view_dir)
    others = [
        p
        for p in view_dir.glob("*/*.parquet")
        if p != placeholder and not p.name.startswith(("_", "."))
    ]
    if others:
        if placeholder.exists():
            placeholder.unlink()
            if not any(placeholder.parent.iterdir()):
                placeholder.parent.rmdir()
        return False
    if not placeholder.exists():
        placeholder.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a reader never sees half a file.
        partial = placeholder.with_name(f".{PLACEHOLDER_FILE}.tmp")
        pq.write_table(offline_arrow_schema(view).empty_table(), partial)
        partial.replace(placeholder)
    return True


def settle_placeholders(settings: Settings, views: Iterable[FeatureView]) -> list[str]:
    """settle_placeholder for each view's offline directory; the views that hold one."""
    return [
        view.name
        for view in views
        if settle_placeholder(settings.offline_store_dir / view.name, view)
    ]
