"""The parquet event history (events/history.py) as Spark DataFrames, for backfills and tools.

Simulator parts (declared columns only) read as they are. Archive parts (``sluice archive``,
events/archive.py) also carry ``_topic``, ``_partition``, ``_offset`` and ``_event_id``: an
event delivered twice (a replay after an ingest crash) is kept once, at its first (topic,
partition, offset), and, given a view, the events that the stream dead-lettered as too late for
that view (the marks under ``_late/<source>/``) are left out, so that the batch engine counts
exactly the events the stream counted. Readers get the declared columns either way.

PySpark is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from batch.compile import spark_type
from batch.offline_store import DAY_MS
from events.history import (
    ARCHIVE_FIELDS,
    EVENT_ID,
    LATE_SCHEMA,
    OFFSET,
    PARTITION,
    TOPIC,
    late_dir,
    parse_part_name,
    partition_dir,
)
from features.schema import EventSource

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructField, StructType


def source_schema(source: EventSource) -> StructType:
    """A source's Spark schema, as the parquet history stores it."""
    from pyspark.sql.types import StructField, StructType

    return StructType(
        [StructField(f.name, spark_type(f.type), nullable=f.nullable) for f in source.fields]
    )


def archive_schema(source: EventSource) -> StructType:
    """Declared columns, then the archive's own (events.history.ARCHIVE_FIELDS)."""
    from pyspark.sql.types import StructType

    return StructType([*source_schema(source).fields, *_arrow_fields(ARCHIVE_FIELDS)])


def late_schema() -> StructType:
    """The late marks' Spark schema (events.history.LATE_SCHEMA)."""
    from pyspark.sql.types import StructType

    return StructType(_arrow_fields(LATE_SCHEMA))


def read_events(
    spark: SparkSession,
    history_dir: Path,
    source: EventSource,
    lo_ms: int,
    hi_ms: int,
    view: str | None = None,
) -> tuple[DataFrame, int]:
    """Events of ``source`` with event time in ``[lo_ms, hi_ms)`` from the parquet history,
    and the number of history rows in the partitions read.

    Archive parts: one row per event id; with ``view``, less the events marked late for it.
    """
    from pyspark.sql import functions as sf

    schema = source_schema(source)
    first, last = lo_ms // DAY_MS, (hi_ms - 1) // DAY_MS
    directories = [partition_dir(history_dir, source, day) for day in range(first, last + 1)]
    files = [p for d in directories if d.is_dir() for p in sorted(d.glob("part-*.parquet"))]
    if not files:
        return spark.createDataFrame([], schema), 0
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    stamp = sf.col(source.event_time_field)
    lo, hi = sf.timestamp_millis(sf.lit(lo_ms)), sf.timestamp_millis(sf.lit(hi_ms))
    in_range = (stamp >= lo) & (stamp < hi)
    plain = [str(p) for p in files if parse_part_name(p.name) is None]
    archived = [str(p) for p in files if parse_part_name(p.name) is not None]
    frames = []
    if plain:
        frames.append(spark.read.schema(schema).parquet(*plain).where(in_range))
    if archived:
        # Copies of one event share its event time, so the range never splits them.
        frame = spark.read.schema(archive_schema(source)).parquet(*archived).where(in_range)
        frame = first_per_event(frame)
        if view is not None:
            frame = drop_late(spark, frame, history_dir, source, view)
        frames.append(frame.select(*schema.fieldNames()))
    events = frames[0]
    for other in frames[1:]:
        events = events.unionByName(other)
    return events, rows


def first_per_event(frame: DataFrame) -> DataFrame:
    """One row per ``_event_id``: the first by (topic, partition, offset), deterministically
    (plain dropDuplicates keeps an arbitrary copy, and which offset survives decides which
    late mark applies)."""
    from pyspark.sql import functions as sf

    names = frame.columns
    others = [c for c in names if c != EVENT_ID]
    first = sf.min_by(sf.struct(*others), sf.struct(TOPIC, PARTITION, OFFSET))
    return (
        frame.groupBy(EVENT_ID)
        .agg(first.alias("__first"))
        .select(EVENT_ID, "__first.*")
        .select(*names)
    )


def drop_late(
    spark: SparkSession, frame: DataFrame, history_dir: Path, source: EventSource, view: str
) -> DataFrame:
    """Archive rows less those whose (topic, partition, offset) the stream marked late for
    ``view``."""
    from pyspark.sql import functions as sf

    marks_files = sorted(late_dir(history_dir, source.name).glob("part-*.parquet"))
    if not marks_files:
        return frame
    marks = (
        spark.read.schema(late_schema())
        .parquet(*(str(p) for p in marks_files))
        .where(sf.col("view") == view)
        .select(
            sf.col("topic").alias(TOPIC),
            sf.col("partition").alias(PARTITION),
            sf.col("offset").alias(OFFSET),
        )
    )
    return frame.join(marks, on=[TOPIC, PARTITION, OFFSET], how="left_anti")


def _arrow_fields(fields: Iterable[Any]) -> list[StructField]:
    """Spark fields for the archive's arrow fields (strings, int32 and int64 only)."""
    from pyspark.sql.types import DataType, IntegerType, LongType, StringType, StructField

    types: dict[Any, DataType] = {
        pa.string(): StringType(),
        pa.int32(): IntegerType(),
        pa.int64(): LongType(),
    }
    return [StructField(f.name, types[f.type], nullable=f.nullable) for f in fields]
