"""Events to Spark DataFrames and Spark rows back to Python, for the engines' parity tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from core.settings import Settings
from features.definitions import FeatureView
from features.reference import RowKey
from features.schema import EventSource, FieldType

Rows = dict[RowKey, dict[str, Any]]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_ms(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(milliseconds=1)


def to_datetime(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def canonical(source: EventSource, payload: Mapping[str, Any]) -> dict[str, Any]:
    """A simulator payload as canonical events carry it: timestamps in epoch ms (exactly)."""
    out = dict(payload)
    for field in source.fields:
        if field.type is FieldType.TIMESTAMP and isinstance(out[field.name], str):
            out[field.name] = to_ms(datetime.fromisoformat(out[field.name]))
    return out


def frame(spark, source: EventSource, events: Sequence[Mapping[str, Any]], *, epoch=False):
    """Events as a Spark DataFrame: timestamp columns as timestamps, or epoch ms longs."""
    from pyspark.sql.types import LongType, StructField, StructType

    from batch.backfill import source_schema

    schema = source_schema(source)
    if epoch:
        schema = StructType(
            [
                StructField(f.name, LongType(), f.nullable)
                if f.name == source.event_time_field
                else f
                for f in schema.fields
            ]
        )
    stamps = {f.name for f in source.fields if f.type is FieldType.TIMESTAMP}
    if epoch:
        stamps.discard(source.event_time_field)
    rows = [
        tuple(
            to_datetime(e[f.name]) if f.name in stamps and e[f.name] is not None else e[f.name]
            for f in source.fields
        )
        for e in events
    ]
    return spark.createDataFrame(rows, schema)


def spark_rows(view: FeatureView, df) -> Rows:
    from pyspark.sql import functions as sf

    names = [s.name for s in view.features()]
    key = view.entity.join_key
    out: Rows = {}
    ms = sf.unix_millis(sf.col("event_timestamp")).alias("__ms")
    for row in df.select(key, ms, *names).collect():
        row_key = (row[key], row["__ms"])
        assert row_key not in out, f"duplicate row {row_key}"
        out[row_key] = {n: row[n] for n in names}
    return out


def isolated_settings(base: Settings, tmp: Path, project: str, **update: Any) -> Settings:
    """The session stack's settings with this module's own Feast project, registry, offline
    store, history and models (so modules never see each other's rows or models)."""
    return base.model_copy(
        update={
            "feast_project": project,
            "feast_registry": tmp / "registry.db",
            "offline_store_dir": tmp / "offline",
            "history_dir": tmp / "history",
            "models_dir": str(tmp / "models"),
            "spark_master": "local[2]",
            **update,
        }
    )


def simulated_history(
    spark: Any, settings: Settings, events: int, start: datetime, *, materialize: bool = False
) -> None:
    """Simulate ``events`` delivery events from ``start`` into the history (not Kafka), then
    backfill every view of the definitions over their days plus margins."""
    from batch.backfill import backfill
    from examples.delivery.produce import produce_synthetic
    from features.registry import load_registry

    report = produce_synthetic(
        settings,
        events,
        start_ms=to_ms(start),
        to_kafka=False,
        history_dir=settings.history_dir,
    )
    registry = load_registry(settings.definitions_module)
    first = to_datetime(report.first_event_ms).date()
    last = to_datetime(report.last_event_ms).date()
    backfill(
        settings,
        list(registry.views.values()),
        first - timedelta(days=1),
        last + timedelta(days=2),
        spark=spark,
        materialize=materialize,
        show_progress=False,
    )
