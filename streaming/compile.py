"""Compile a FeatureView to what the Flink job needs: a window plan and the Kafka source table.

Compilation is pure Python and runs before any JVM starts, so a view the engine cannot run
fails here with UnsupportedViewError naming the view and the field.

Why the DataStream API with a KeyedProcessFunction rather than SQL HOP windows: a HOP window
emits a row only for windows that hold events, so the smaller empty windows of a busy end and
the "closing" row after each run (see features/reference.py:with_closing_rows) cannot be
expressed, and a view with several window sizes would need one HOP per size plus a join. One
function that keeps per-key tiles (partial states per slide bucket, merged per window by the
aggregation objects of features/aggregations.py) and fires an event-time timer at each window
end computes every window of a view from one state and emits exactly the reference rows. The
source is still declared in SQL: only the SQL Kafka table exposes each record's partition and
offset (the dead-letter headers need them) next to a WATERMARK on the record timestamp that
Flink pushes into the source, per partition. Ingest's heartbeats move that watermark like any
record; the table flags them from their header (in the JVM, so that only a boolean crosses
to Python) and the job drops them before parsing.

Lateness (one definition, used by the job and documented in streaming/__init__.py):
  watermark W = min over the source's partitions of (greatest Kafka timestamp read from that
  partition) - source.allowed_lateness. An event that passes the view's filter is too late
  when, on arrival, W has reached the end of its slide bucket, floor(t / slide) * slide +
  slide: the row of that end (its smallest window) was already emitted, and counting the
  event now would make emitted rows disagree with the events. Too-late events go to the
  dead-letter topic with reason "late". Consequence: an event at most allowed_lateness behind
  the newest earlier event of its own partition always counts; a later one counts while its
  bucket's end is still ahead of W.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.records import H_KIND, KIND_HEARTBEAT
from features.aggregations import AGGREGATIONS
from features.definitions import AggregationFunction, FeatureView, empty_value
from features.schema import FieldType
from streaming.errors import UnsupportedViewError

# Tiles per key for the largest window: the state per key grows with it, and a view like 30d
# every 1s (2.6 million tiles per key) would never keep up. 43,200 is 30 days (the longest
# window a definition allows) on 1-minute slides: the tile engine keeps one Flink state entry
# per tile and merges long windows incrementally (streaming/tile_state.py, windows.py).
MAX_TILES_PER_WINDOW = 43_200
# The event engine keeps a key's tiles, with the ids of their events, as one pickled value,
# read and rewritten on every event: it stays at 4,096 tiles (about 2.8 days of 1-minute
# slides) and names the tile engine for more.
EVENT_ENGINE_MAX_TILES = 4096
_NUMERIC = (FieldType.INT, FieldType.FLOAT)


def features_topic(view_name: str) -> str:
    """Topic of the rows a view's stream emits, for monitoring (JSON, keyed by entity)."""
    return f"features.{view_name}"


def group_id(view_name: str) -> str:
    """Kafka consumer group of a view's source reader (offsets committed at checkpoints)."""
    return f"sluice-stream-{view_name}"


@dataclass(frozen=True)
class Spec:
    """One feature: the tile slot holding its partial states, and its window size."""

    name: str
    function: AggregationFunction
    slot: int  # index into CompiledView.slots (and into every tile)
    window_ms: int


# A tile slot: (index into CompiledView.columns, or None for a function that reads no column,
# such as count; the function whose partial state the slot keeps).
Slot = tuple[int | None, AggregationFunction]


@dataclass(frozen=True)
class CompiledView:
    """Everything the job's functions need about one view; small and picklable."""

    view: FeatureView
    key_column: str
    time_field: str
    slide_ms: int
    max_window_ms: int
    window_sizes_ms: tuple[int, ...]
    columns: tuple[str, ...]  # aggregated columns, in the order events carry their values
    slots: tuple[Slot, ...]  # one partial state per slot in each tile
    specs: tuple[Spec, ...]
    derived: tuple[tuple[str, str], ...]  # (name, expression), applied in order
    filter: str | None
    topic: str
    allowed_lateness_ms: int

    @property
    def name(self) -> str:
        return self.view.name

    def empty_row(self) -> dict[str, Any]:
        return {s.name: empty_value(s.function) for s in self.specs}


def check_event_engine(compiled: CompiledView) -> None:
    """UnsupportedViewError when the per-event engine cannot keep the view's windows."""
    tiles = compiled.max_window_ms // compiled.slide_ms
    if tiles > EVENT_ENGINE_MAX_TILES:
        largest = compiled.view.max_window
        raise UnsupportedViewError(
            compiled.name,
            f"windows.{largest.name}",
            f"{tiles} slides per window; the per-event engine keeps at most "
            f"{EVENT_ENGINE_MAX_TILES}: run it on the tile engine (SLUICE_STREAM_ENGINE=tiles, "
            f"JobOptions.engine='tiles'), or use a longer slide",
        )


def compile_view(view: FeatureView) -> CompiledView:
    """The plan of one view, or UnsupportedViewError."""

    def fail(field: str, reason: str) -> UnsupportedViewError:
        return UnsupportedViewError(view.name, field, reason)

    if "flink" not in view.engines:
        raise fail("kind", f"a {view.kind} view runs on {', '.join(view.engines)}, not on Flink")
    types = view.column_types()
    largest = view.max_window
    if largest.size_ms // view.slide_ms > MAX_TILES_PER_WINDOW:
        raise fail(
            f"windows.{largest.name}",
            f"{largest.size_ms // view.slide_ms} slides per window; the stream engine keeps at "
            f"most {MAX_TILES_PER_WINDOW} (use a longer slide or a batch view)",
        )
    columns: list[str] = []
    slots: list[Slot] = []
    specs: list[Spec] = []
    for feature in view.features():
        aggregator = AGGREGATIONS.get(feature.function)
        if aggregator is None:
            raise fail(f"features.{feature.name}", f"aggregation {feature.function} is unknown")
        index = None
        if aggregator.reads_column:
            assert feature.column is not None  # the definition checks this
            if aggregator.needs_number and types[feature.column] not in _NUMERIC:
                raise fail(
                    f"features.{feature.name}",
                    f"{types[feature.column]} column {feature.column!r} cannot be aggregated "
                    f"by {feature.function}",
                )
            if feature.column not in columns:
                columns.append(feature.column)
            index = columns.index(feature.column)
        # Features of one function over one column share a slot across window sizes: a tile
        # keeps each partial state once.
        slot = (index, feature.function)
        if slot not in slots:
            slots.append(slot)
        size = feature.window.size_ms
        specs.append(Spec(feature.name, feature.function, slots.index(slot), size))
    return CompiledView(
        view=view,
        key_column=view.key_column,
        time_field=view.source.event_time_field,
        slide_ms=view.slide_ms,
        max_window_ms=largest.size_ms,
        window_sizes_ms=tuple(w.size_ms for w in view.windows),
        columns=tuple(columns),
        slots=tuple(slots),
        specs=tuple(specs),
        derived=tuple(view.derived.items()),
        filter=view.filter,
        topic=view.source.topic,
        allowed_lateness_ms=int(view.source.allowed_lateness.total_seconds() * 1000),
    )


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# Whether a source record is one of ingest's heartbeats (header sluice.kind), in the JVM.
HEARTBEAT_SQL = f"COALESCE(`headers`[{_quote(H_KIND)}] = X'{KIND_HEARTBEAT.encode().hex()}', FALSE)"


# The columns the job's Python functions get from a source, in this order (functions.py).
SOURCE_COLUMNS = ("key", "value", "partition", "offset", "heartbeat")


def source_query(table: str) -> str:
    """The source's rows as the job reads them: SOURCE_COLUMNS. The headers map stays in the
    JVM (only the heartbeat flag crosses to Python); the record timestamp travels as the
    watermark, which every operator forwards, not as a column."""
    return f"SELECT {', '.join(f'`{c}`' for c in SOURCE_COLUMNS)} FROM `{table}`"


def source_table_sql(
    compiled: CompiledView,
    table: str,
    bootstrap: str,
    kafka_properties: dict[str, str],
    stop_offsets: dict[int, int] | None,
    idle_timeout_ms: int = 0,
    rowtime: str | None = None,
) -> str:
    """DDL of the view's Kafka source: key and value bytes, partition, offset, watermarked time,
    and whether the record is a heartbeat (header sluice.kind, core.records.is_heartbeat).

    Reads from the earliest offset when no checkpoint is restored: a view's windows are state,
    and starting at committed offsets without that state would publish undercounted windows.
    ``idle_timeout_ms`` > 0: a partition without records for that long stops holding the
    watermark back (``scan.watermark.idle-timeout``) until its next record.
    """
    lateness_s = compiled.allowed_lateness_ms / 1000
    options = {
        "connector": "kafka",
        "topic": compiled.topic,
        "properties.bootstrap.servers": bootstrap,
        "properties.group.id": group_id(compiled.name),
        "scan.startup.mode": "earliest-offset",
        "key.format": "raw",
        "key.fields": "key",
        "value.format": "raw",
        "value.fields-include": "EXCEPT_KEY",
    }
    options |= {f"properties.{k}": str(v) for k, v in kafka_properties.items()}
    if idle_timeout_ms > 0:
        options["scan.watermark.idle-timeout"] = f"{idle_timeout_ms} ms"
    if stop_offsets is not None:
        # Exclusive: the record at the stopping offset is not read. Every partition is listed,
        # since a partition left out would stop at once.
        options["scan.bounded.mode"] = "specific-offsets"
        options["scan.bounded.specific-offsets"] = ";".join(
            f"partition:{p},offset:{o}" for p, o in sorted(stop_offsets.items())
        )
    with_clause = ",\n  ".join(f"{_quote(k)} = {_quote(v)}" for k, v in options.items())
    time_column = "event_ts"
    extra = ""
    if rowtime is not None:
        # The tile engine's event time (streaming/tiles.py): a computed column.
        time_column = "rt"
        # ... and its read counts per processing-time interval (tiles.READ_INTERVAL_MS).
        extra = f"\n  `rt` AS {rowtime},\n  `pt` AS PROCTIME(),"
    return f"""CREATE TEMPORARY TABLE `{table}` (
  `key` BYTES,
  `value` BYTES,
  `partition` INT METADATA VIRTUAL,
  `offset` BIGINT METADATA VIRTUAL,
  `event_ts` TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL,
  `headers` MAP<STRING, BYTES> METADATA VIRTUAL,
  `heartbeat` AS {HEARTBEAT_SQL},{extra}
  WATERMARK FOR `{time_column}` AS `{time_column}` - INTERVAL '{lateness_s:.3f}' SECOND(3)
) WITH (
  {with_clause}
)"""
