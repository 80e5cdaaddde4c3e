"""The offline store: window rows of every view as parquet, partitioned by UTC date.

Contract (the Feast repository reads it; keep it exactly):

    <offline_store_dir>/<view.name>/date=YYYY-MM-DD/part-*.parquet

hive-style partitions by the UTC date of ``event_timestamp``; columns, in order: the entity
join key (string), ``event_timestamp`` (the window end, timestamp[us, UTC]),
``servable_timestamp`` (window end + the view's lateness: when the row may be served, the
availability contract of features/contract.py; Feast's point-in-time join keys on it),
``created_timestamp`` (when the row was written, timestamp[us, UTC]), then one column per
feature in ``view.features()`` order (int64 for counts, double for floats, the column's type
for ``last``). Closing rows (all features empty) are included. The ``date`` column lives in
the path only. (entity, event_timestamp) is unique. A view without rows holds one empty file
with this schema under ``date=1970-01-01`` (feature_repo/offline.py), so that Feast can read it.

Writes replace whole date partitions (Spark's dynamic partition overwrite): re-running a range
replaces its dates and never duplicates rows; dates outside the range are left alone. Also here:
``_backfill_state.json`` in the store's root, the last completed window end per view.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.compile import EVENT_TIMESTAMP, spark_type
from batch.errors import OfflineStoreError
from core.settings import Settings
from feature_repo.offline import offline_arrow_schema, settle_placeholder
from features.contract import lateness_ms
from features.definitions import FeatureView

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

CREATED_TIMESTAMP = "created_timestamp"
SERVABLE_TIMESTAMP = "servable_timestamp"
DATE = "date"
STATE_FILE = "_backfill_state.json"
DAY_MS = 86_400_000


def view_dir(settings: Settings, view: FeatureView) -> Path:
    return settings.offline_store_dir / view.name


def partition_dir(settings: Settings, view: FeatureView, day: date) -> Path:
    return view_dir(settings, view) / f"{DATE}={day.isoformat()}"


def offline_columns(view: FeatureView) -> list[str]:
    """Column names of the store's files, in order."""
    features = [spec.name for spec in view.features()]
    return [view.entity.join_key, EVENT_TIMESTAMP, SERVABLE_TIMESTAMP, CREATED_TIMESTAMP, *features]


def offline_schema(view: FeatureView) -> StructType:
    """The Spark schema of the store's files (without the ``date`` partition column)."""
    from pyspark.sql.types import StringType, StructField, StructType, TimestampType

    return StructType(
        [
            StructField(view.entity.join_key, StringType()),
            StructField(EVENT_TIMESTAMP, TimestampType()),
            StructField(SERVABLE_TIMESTAMP, TimestampType()),
            StructField(CREATED_TIMESTAMP, TimestampType()),
            *(StructField(spec.name, spark_type(spec.dtype)) for spec in view.features()),
        ]
    )


def write_offline(
    settings: Settings, view: FeatureView, rows: DataFrame, days: Iterable[date]
) -> int:
    """Replace the view's partitions for ``days`` with ``rows`` (compile_view's output).

    Rows whose window end falls outside ``days`` are not written. A date of ``days`` that gets
    no row this time loses its old partition too, so the store holds exactly this run's rows
    for the whole range. Returns the number of rows now in those partitions.
    """
    from pyspark.sql import functions as sf

    days = sorted(set(days))
    if not days:
        return 0
    before = {day: _part_files(partition_dir(settings, view, day)) for day in days}
    lo = datetime.combine(days[0], datetime.min.time(), UTC)
    hi = datetime.combine(days[-1] + timedelta(days=1), datetime.min.time(), UTC)
    key = view.entity.join_key
    out = (
        rows.where((sf.col(EVENT_TIMESTAMP) >= sf.lit(lo)) & (sf.col(EVENT_TIMESTAMP) < sf.lit(hi)))
        .withColumn(
            SERVABLE_TIMESTAMP,
            sf.timestamp_millis(
                sf.unix_millis(sf.col(EVENT_TIMESTAMP)) + sf.lit(lateness_ms(view))
            ),
        )
        .withColumn(CREATED_TIMESTAMP, sf.current_timestamp())
        .withColumn(DATE, sf.date_format(sf.col(EVENT_TIMESTAMP), "yyyy-MM-dd"))
        .select(*offline_columns(view), DATE)
        # One file per date, sorted: readers (Feast, pyarrow) get few, ordered files.
        .repartition(DATE)
        .sortWithinPartitions(key, EVENT_TIMESTAMP)
    )
    (
        out.write.mode("overwrite")
        .option("partitionOverwriteMode", "dynamic")
        .partitionBy(DATE)
        .parquet(str(view_dir(settings, view)))
    )
    # Dynamic overwrite replaces only the dates that received rows. A date whose files are all
    # from before this write got none: its old rows no longer hold, so drop the partition.
    written = 0
    for day in days:
        directory = partition_dir(settings, view, day)
        files = _part_files(directory)
        if files and files <= before[day]:
            shutil.rmtree(directory)
            continue
        written += sum(pq.ParquetFile(directory / name).metadata.num_rows for name in files)
    # Readable by Feast with or without rows: an empty file while the view has none.
    settle_placeholder(view_dir(settings, view), view)
    return written


@overload
def read_offline(
    engine: SparkSession,
    settings: Settings,
    view: FeatureView,
    start: datetime | None = None,
    end: datetime | None = None,
) -> DataFrame: ...


@overload
def read_offline(
    engine: Literal["pyarrow"],
    settings: Settings,
    view: FeatureView,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pa.Table: ...


def read_offline(
    engine: SparkSession | Literal["pyarrow"],
    settings: Settings,
    view: FeatureView,
    start: datetime | None = None,
    end: datetime | None = None,
) -> DataFrame | pa.Table:
    """The view's rows with ``start <= event_timestamp < end`` (either bound optional), read
    with Spark (a DataFrame) or with pyarrow (``engine="pyarrow"``: a Table, no JVM)."""
    if isinstance(engine, str):
        return _read_arrow(settings, view, start, end)
    from pyspark.sql import functions as sf
    from pyspark.sql.types import DateType, StructField

    schema = offline_schema(view).add(StructField(DATE, DateType()))
    directory = view_dir(settings, view)
    if not any(directory.glob(f"{DATE}=*/*.parquet")):
        return engine.createDataFrame([], offline_schema(view))
    frame = engine.read.schema(schema).parquet(str(directory))
    # Filters on the partition column prune whole directories before any file is opened.
    if start is not None:
        frame = frame.where(sf.col(DATE) >= sf.lit(_utc(start).date()))
        frame = frame.where(sf.col(EVENT_TIMESTAMP) >= sf.lit(_utc(start)))
    if end is not None:
        frame = frame.where(sf.col(DATE) <= sf.lit(_utc(end).date()))
        frame = frame.where(sf.col(EVENT_TIMESTAMP) < sf.lit(_utc(end)))
    return frame.drop(DATE)


def _read_arrow(
    settings: Settings, view: FeatureView, start: datetime | None, end: datetime | None
) -> pa.Table:
    tables = []
    for directory in sorted(view_dir(settings, view).glob(f"{DATE}=*")):
        day = date.fromisoformat(directory.name.partition("=")[2])
        if start is not None and day < _utc(start).date():
            continue
        if end is not None and day > _utc(end).date():
            continue
        tables += [pq.read_table(directory / name) for name in sorted(_part_files(directory))]
    if not tables:
        return offline_arrow_schema(view).empty_table()
    table = pa.concat_tables(tables)
    stamps = table[EVENT_TIMESTAMP]
    if start is not None:
        table = table.filter(pc.greater_equal(stamps, pa.scalar(_utc(start), stamps.type)))
        stamps = table[EVENT_TIMESTAMP]
    if end is not None:
        table = table.filter(pc.less(stamps, pa.scalar(_utc(end), stamps.type)))
    return table


def _part_files(directory: Path) -> set[str]:
    if not directory.is_dir():
        return set()
    return {p.name for p in directory.glob("part-*.parquet")}


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise OfflineStoreError(f"{moment.isoformat()}: give times with a timezone (UTC)")
    return moment.astimezone(UTC)


# --- backfill state -------------------------------------------------------------------------


def load_state(settings: Settings) -> dict[str, int]:
    """View name -> epoch ms before which every window end has been written."""
    path = settings.offline_store_dir / STATE_FILE
    if not path.exists():
        return {}
    try:
        document: dict[str, Any] = json.loads(path.read_text())
        return {name: int(entry["completed_until_ms"]) for name, entry in document["views"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OfflineStoreError(f"{path}: unreadable backfill state ({exc})") from exc


def save_state(settings: Settings, state: dict[str, int]) -> None:
    """Write the state atomically (a crash leaves the old file or the new one, never half)."""
    path = settings.offline_store_dir / STATE_FILE
    views = {
        name: {
            "completed_until": datetime.fromtimestamp(ms / 1000, UTC).isoformat(),
            "completed_until_ms": ms,
        }
        for name, ms in sorted(state.items())
    }
    document = {"version": 1, "updated_at": datetime.now(UTC).isoformat(), "views": views}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(document, indent=2) + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        raise OfflineStoreError(f"{path}: cannot write backfill state ({exc})") from exc
