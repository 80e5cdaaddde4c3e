"""The tile engine's SQL: decode, derive, filter, late check and per-tile partial states in Java.

Flink SQL over the view's Kafka source does the per-event work; Python (streaming/tile_functions.py)
gets one row per (entity, slide bucket, partition) instead of one per event, and assembles
windows from them with the same window code as the event engine (streaming/windows.py).

Per view, one query (one source scan), a UNION ALL of four kinds of rows:

  tile rows   TUMBLE(slide) windows on the event time, one aggregation per (bucket, entity,
              partition) computing each slot's partial state (below) over the tile's distinct
              events: ingest is at least once, and a repeat counts once, as in the event engine.
              An event is identified by a 128-bit hash of the record's bytes
              (streaming/java/sluice/EventId.java); sluice_distinct_sums (DistinctSums.java)
              keeps the tile's ids and computes the states a repeat would change (the distinct
              events, sums, moments), and min, max, last and count_distinct, which a repeat of
              the same bytes does not change, are plain aggregates over every copy. Ingest keys
              every record by its entity, so a repeat lands in its original's partition (a
              repeat in another partition, after the topic's partitions changed, would count
              in each). Until plan 8 a first aggregation per event id deduplicated: its keyed
              state and timer per event cost more than the rest of the query once tiles hold
              many events (bench.stream's tiles-live). Events the filter drops become rows of
              a NULL entity grouped by partition: only their number and offsets.
  closed rows per slide, the kept events of the tiles that closed (a window aggregation
              over the tile rows: copies and unique events summed), so that the aggregated
              and duplicate counts arrive under one key (below). One row per slide, not per
              partition and slide as before plan 6: a quarter of the rows into Python with
              the bench's four partitions, and the offsets they carried come with the tile
              rows anyway.
  read rows   per partition and 100 ms of processing time, the number of events read (not
              heartbeats) and the last offset: events are counted when read.
  side rows   one row per record that is not aggregated in Java, with its raw bytes: heartbeats
              (counted, they moved the watermark already), events the SQL decode cannot read
              (the event engine's parser names the reason and dead-letters them) and late events
              (dead-lettered with reason "late"). A window aggregation drops late records
              silently, so the late check runs before it, in SQL, with CURRENT_WATERMARK.

Decode: sluice_json_fields (streaming/java/sluice/JsonFields.java) streams each record's JSON
once into a row of the fields' text, cast in SQL; the source's event-time column reads its
time field with the same function and the same cast (_json), so the two agree on every record.

Lateness: Flink's window operators treat a record as late when its window's end - 1 is at or
before the watermark (the window fired at W >= end - 1). The check before them uses the same
rule, end <= W + 1 (the event engine's is end <= W): the one millisecond keeps every event the
SQL lets through countable by the window operator, whose watermark is never ahead of the one
the check saw, so nothing is lost silently; counts in == counts out.

Partial states per slot, from the deduplicated events of a tile (features/aggregations.py):
  count           distinct events (sluice_distinct_sums)
  sum, mean       its count of x and ExactSum's text   -> (n, (hi, lo))
  min, max        MIN(x), MAX(x)
  last            MAX(19-digit t || sortable value)    -> (t, value): greatest t, then value
  stddev          its Moments' text ("n c d m2")       -> the reference's (n, c, d, M2)
  count_distinct  JSON_STRING(ARRAY_AGG(DISTINCT x))   -> set
Sums and moments are exact in the JVM (Java aggregates over exact binary sums, BinarySum.java:
ExactSum.java, Moments.java in streaming/java/sluice), then rounded once: Flink SQL's
SUM(DOUBLE) rounds at every addition in an order that is not fixed (the window aggregate's
local/global phases flush at watermarks and checkpoint barriers, a cascaded window emits in
its timer queue's order), so a tile summed again after a restore could differ in its last bits
and a replayed row differ from the row emitted before (seen in test_fault_pipeline). A tile's
state depends only on its events. Python merges the tiles of a window in bucket order, as before.
A view the tile engine cannot express exactly (last over a float column) runs on the event
engine (tile_support).

A 30-day window on 1-minute slides (43,200 tiles per key, compile.MAX_TILES_PER_WINDOW; the
event engine stays at 4,096 and its error names this engine). Hour tiles would not shrink the
state: they are exact for every aggregation only for the hours wholly inside a window, and the
old end's partial hour is, in turn, every hour of the last 30 days, so every minute tile is kept
for 30 days anyway. What made it unworkable was the Python side keeping a key's tiles as one
pickled value, read and rewritten on every tile row and every firing (0.8 MB per key), and
merging all 43,200 tiles at every end. Now (streaming/tile_state.py, streaming/windows.py): one
MapState entry per tile (a tile row writes its tile, a firing removes the tiles it evicted and
writes its shard's next end), decoded shards cached in Python (least recently used out past
500,000 tiles; a miss, e.g. after a restore, reads the shard back), and windows longer than 240
slides assembled by a two-stacks queue of merges (WindowQueue: a firing costs the tiles that
entered and left, exact for min/max/last, count_distinct by counts per value, float states
within rounding). Measured with `python -m bench.stream_windows` (Python only, one key, one tile
row and one firing per minute, median; 2026-12-05, load 3.5): restaurant_orders with 30-day
windows 189 ms per key and minute before, 0.70 ms now (269x); zone_couriers (stddev,
count_distinct) 379 ms before, 0.72 ms now (527x); the slowest minute, when a queue turns its
newer stack into the older one (once per 30 days per key), 146 / 127 ms. What is left is linear
in the key's tiles but cheap: the sorted bucket list of each firing (most of the 0.7 ms). The
state per key is its open tiles: at most 43,200 per window size, whatever the number of events.
Every view keeps its tiles so, keyed by shard of entities (tile_state.py): one layout, where
keyed by entity short windows kept one pickled value per key (MapState, with a next end per key
written at every firing, did not pay there: 0.74x the events/s). bench.stream's tiles-30d job
(the views with 30-day windows, 8 keys a view, against the same views as they are on the same
events, three runs at load 5-8): 1.5x, 2.0x and 2.1x the CPU per event (60-156 us against 40-73
us), much of it the 43,200 closing rows per key at the end of the input, which the marginal rate
does not wholly cancel; its events/s was too noisy to quote (once nan: the full run no slower
than the small one).

The default engine since 2026-12-06, when the whole test suite (925 tests, CI's `make test`)
passed with SLUICE_STREAM_ENGINE=tiles but for one test that named the event engine's
snapshot directory (job_dir now follows the settings' engine).
Known differences from the event engine. Measured 2026-12-05
with SLUICE_STREAM_ENGINE=tiles on a shared machine (load 10-16). After the fixes below, under
tiles: flink parity, tile sums, both restart tests, on-time, CLI stream and the fault test's
stream SIGKILL (4 runs) pass; test_live_consistency passed 4 times and failed once, at load 16,
by its last bound (outside ingest's outage 21 of 6,716 samples behind or different, at most
6 allowed): rows landing after their servable time, the tile engine being slower to start
and slightly less fresh (below). The event engine passed the same test at the same load.
  - test_live_consistency.py's "70% MISSING" was two things. Most MISSING samples are
    restaurants that had no order yet (training agrees: empty, not a mismatch). The mismatches
    came from the start: the tile job takes 10-25 s longer to start than the event engine's
    (javac of streaming/java into a fresh state dir, a larger SQL plan), 40-60 s in all under
    that load, and the test's fixed 15 s wait sampled a stream that had not read anything; at
    that load the event engine failed the same way. The test now waits until the job reads.
  - freshness in that live run (row emitted minus window end, outside start-up and ingest's
    outage): tiles p50 3.0 s (zones) / 3.7 s (restaurants, ~1,500 rows per end), p99 3.7 /
    5.2 s; events p50 2.7 / 3.1 s, p99 3.4 / 5.3 s. The view's lateness is 5 s.
  - test_fault_pipeline's stream SIGKILL test: a replayed row differed (the float sums, fixed
    above) and its probe, produced 13 minutes behind its partition, was dead-lettered as late.
    The late rule is the event engine's (the bucket's end reached by the watermark; here end
    <= W + 1, see above), but it reads the watermark at the source, where the event engine's
    Python check reads it as of the previous bundle: a record that far out of order is late or
    not by timing in either engine. The test now produces the probe at its time.
Statistics that survive a restore. Every row that changes a counter (read, side, closed rows
and the filter's entity-less tile rows) goes to the Python function under the one side key, and
the counters are that key's keyed state (streaming/tile_counts.py): a snapshot holds them as
of its barrier, with the offsets and windows, and a restored run continues from them (its
records name them as ``restored``). Why so, and not otherwise:
  - PyFlink's Python functions have keyed state only (no operator ListState), and only while a
    key is current, which it never is at a bundle's end. Counters kept per entity key could
    not be summed after a restore (keyed state cannot be iterated), so the per-entity count
    (aggregated, duplicates) moved into the SQL: the closed rows.
  - Cumulative counts in a non-windowed SQL GROUP BY would bring an update stream (retractions)
    into the DataStream, and could not count what Python decides: whether an event the SQL
    could not read is filtered or rejected, and which side rows are heartbeats.
  - Cost: per partition, one read row per 100 ms and at most one filter row per slide, and one
    closed row per slide, each a small pickled dict written to state; in the JVM, one more window
    aggregation over the tile rows (per tile, not per event). The closed rows read every
    column of the tile rows (MIN/MAX of t and the slots, ignored in Python): with the counts
    alone, the planner pruned its copy of the tile aggregation and ran that copy over every
    event (about +5 us of CPU per event, measured then), instead of sharing the one
    aggregation with the tile rows.
  - Rows written (PublishCounts.rows) are emitted by the timers of every shard key, so each
    shard counts its own in its state, summed as a restored run reads the shards back
    (streaming/tile_state.py).
Other differences:
  - counts: events are counted when read, by read rows (per partition and 100 ms of processing
    time: a branch of the query, a processing-time TUMBLE over the source), and processed
    when their tile closes; in between they are open (WindowCounts.open), and a stop carries
    them in its snapshot to the next run (tile_functions.py);
  - freshness: two cascaded window operators before Python add about 0.3-0.5 s (bench.stream);
  - input that bypassed ingest: a numeric entity key is read as its text (the event engine
    dead-letters it as wrong_type); events past 2262 or before 1970 are not supported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson

from features.aggregations import AggregationFunction as F
from features.expressions import columns_of, parse, to_flink_sql
from features.schema import FieldType
from streaming import tile_state
from streaming.compile import HEARTBEAT_SQL, CompiledView, _quote

_SQL_TYPES = {
    FieldType.INT: "BIGINT",
    FieldType.TIMESTAMP: "BIGINT",
    FieldType.FLOAT: "DOUBLE",
    FieldType.BOOL: "BOOLEAN",
    FieldType.STRING: "STRING",
}
LAST_TIME_DIGITS = 19
# streaming/java/sluice/Moments.java: the Stddev state (n, c, d, M2) of features/aggregations.py,
# as the text "n c d m2" (Java's double to text round-trips exactly). Arrays and rows do not
# cross to PyFlink's DataStream (its type conversion fails on them), text does.
# BIGINT values sort as strings once shifted to non-negative: "1" + 19 digits for x >= 0,
# "0" + 19 digits of x + (2^63 - 1) for x < 0.
_LONG_MAX = 9_223_372_036_854_775_807

# The columns of every row the query emits, in order (tile_functions.py reads them by index).
KIND, KEY, T, PART, OFF, COPIES, UNIQUE, HEARTBEAT, LATE, RAW, RAW_KEY = range(11)
FIXED = ("kind", "k", "t", "part", "off", "copies", "uniq", "hb", "late", "raw", "raw_key")
SLOTS_FROM = len(FIXED)
KIND_TILE, KIND_SIDE, KIND_READ, KIND_CLOSED = "T", "S", "R", "C"
# Rows of the JVM's window assembly (engine "tiles-java", streaming/java/sluice/TileWindows.java)
# in the same shape: an entity's newest row of a firing (KEY, T its end, RAW its features-topic
# record, COPIES the rows the firing wrote, OFF the watermark that fired it) and a shard's rows
# written before a restore (COPIES).
KIND_WINDOW, KIND_RESTORED = "W", "X"
# Read rows: per partition, how many events (not heartbeats) the source read in each interval
# of processing time, so that events are counted when read, not when their tile closes.
READ_INTERVAL_MS = 100


# The layout of the tile engine's snapshots. Bump it with every change of the query's plan
# (an operator added or removed) or of the Python function's keyed state: Flink cannot map an
# older plan's operator state to the new one (measured: the restore fails, "Cannot map
# checkpoint/savepoint state for operator"), and a changed keyed state would be misread, so
# a new layout starts afresh in a snapshot directory of its own (streaming/job.job_dir), as a
# changed view does. 2: the closed rows (statistics in the job's state). 3: keyed by shard of
# entities, one MapState entry per tile (streaming/tile_state.py). 4: the shard computed in
# the SQL and keyed in Java, without PyFlink's key_by map (job._keyed_by_shard). 5: each shard's
# rows written in its state (tile_state.ROWS_ENTRY) and a processing-time timer per shard. 6: the
# closed rows grouped by slide only (no partition). 7: the sums' and moments' accumulators
# exact in binary (BinarySum.java), the moments as text. 8: one window aggregation per tile,
# deduplicating in it (sluice_distinct_sums), not a first aggregation per event id. 9: the
# closed rows read the tiles' `off` too, so the planner runs that aggregation once, not twice.
PLAN_VERSION = 9

# Table settings of a job that runs tile queries (streaming/job.py applies them). ONE_PHASE:
# no local pre-aggregation before each window aggregation's shuffle. Measured with the two
# aggregations before plan 8 (SQL alone into a blackhole, 300k events, CPU of the JVM per
# event): 29.2 us one phase against 32.4 us two phases. The tile aggregation could not run in
# two now: sluice_distinct_sums has no merge (a merge of two parts could not take a repeat out
# of both), and Flink's two-phase rules apply only when every aggregate can merge.
TABLE_CONFIG = {"table.optimizer.agg-phase-strategy": "ONE_PHASE"}


def tile_support(compiled: CompiledView) -> str | None:
    """None when the tile engine runs the view exactly; else why not (it runs per event)."""
    types = compiled.view.column_types()
    for index, function in compiled.slots:
        if function is F.LAST and index is not None:
            column = compiled.columns[index]
            if types[column] is FieldType.FLOAT:
                return f"last over the float column {column!r} has no sortable SQL encoding"
    return None


def slot_widths(compiled: CompiledView) -> tuple[int, ...]:
    """How many columns each slot's partial state takes in a tile row."""
    widths = {F.COUNT: 1, F.SUM: 2, F.MEAN: 2, F.MIN: 1, F.MAX: 1, F.LAST: 1, F.STDDEV: 1}
    return tuple(widths.get(function, 1) for _, function in compiled.slots)


def _interval(ms: int) -> str:
    return f"INTERVAL '{ms / 1000:.3f}' SECOND(9, 3)"


def _json(column: str, sql_type: str) -> str:
    """One top-level field of the source's raw value, typed (the same text and the same cast as
    the query's decode, _field: the two agree on every record)."""
    return _field(column, sql_type, f"sluice_json_fields(`value`, {_quote(column)})")


def _field(name: str, sql_type: str, parsed: str = "`_f`") -> str:
    """One field of the parsed record (sluice_json_fields: a row of the fields' JSON text)."""
    text = f"{parsed}.`{name}`"
    return text if sql_type == "STRING" else f"TRY_CAST({text} AS {sql_type})"


def rowtime_column(compiled: CompiledView) -> str:
    """The source's event-time column: the event's own time field for events (ingest stamps
    the record with it too), the record timestamp for heartbeats and unreadable records."""
    t = _json(compiled.time_field, "BIGINT")
    event_time = f"COALESCE(TO_TIMESTAMP_LTZ({t}, 3), `event_ts`)"
    return f"CASE WHEN {HEARTBEAT_SQL} THEN `event_ts` ELSE {event_time} END"


def _last_encoding(value: str, field_type: FieldType) -> str:
    if field_type is FieldType.STRING:
        return value
    if field_type is FieldType.BOOL:
        return f"CAST({value} AS STRING)"  # FALSE < TRUE, as in Python
    return (
        f"(CASE WHEN {value} >= 0 THEN CONCAT('1', LPAD(CAST({value} AS STRING), 19, '0')) "
        f"ELSE CONCAT('0', LPAD(CAST({value} + {_LONG_MAX} AS STRING), 19, '0')) END)"
    )


def decode_last(encoded: str, field_type: FieldType) -> tuple[int, object]:
    """(t, value) of a last state encoded by the query."""
    t = int(encoded[:LAST_TIME_DIGITS])
    text = encoded[LAST_TIME_DIGITS:]
    if field_type is FieldType.STRING:
        return t, text
    if field_type is FieldType.BOOL:
        return t, text == "TRUE"
    number = int(text[1:])
    return t, number if text[0] == "1" else number - _LONG_MAX


def _slot_sql(
    function: F, column: str | None, field_type: FieldType | None, sums: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """(SQL, SQL type) of each column of one slot's state, over the tile's events. The states a
    repeated event would change are fields of sluice_distinct_sums' text `_d` (DistinctSums.java:
    its distinct events first, then per entry of ``sums``, which this appends to, kind and value);
    the others are aggregates over every copy, which a repeat does not change."""

    def field(at: int, sql_type: str) -> str:
        text = f"NULLIF(SPLIT_INDEX(`_d`, ';', {at}), '')"
        return text if sql_type == "STRING" else f"CAST({text} AS {sql_type})"

    at = 1 + sum(2 if kind == "s" else 1 for kind, _ in sums)  # the next field of `_d`
    if function is F.COUNT or column is None:
        return [(field(0, "BIGINT"), "BIGINT")]
    c = f"`{column}`"
    x = f"CAST({c} AS DOUBLE)"
    if function in (F.SUM, F.MEAN):
        sums.append(("s", x))
        return [(field(at, "BIGINT"), "BIGINT"), (field(at + 1, "STRING"), "STRING")]
    if function is F.STDDEV:
        sums.append(("m", x))
        return [(field(at, "STRING"), "STRING")]
    if function is F.MIN:
        return [(f"MIN({x})", "DOUBLE")]
    if function is F.MAX:
        return [(f"MAX({x})", "DOUBLE")]
    assert field_type is not None
    if function is F.LAST:
        stamp = f"LPAD(CAST(`_t` AS STRING), {LAST_TIME_DIGITS}, '0')"
        return [(f"MAX(CONCAT({stamp}, {_last_encoding(c, field_type)}))", "STRING")]
    return [(f"JSON_STRING(ARRAY_AGG(DISTINCT {c}))", "STRING")]


def tile_query(compiled: CompiledView, table: str) -> tuple[list[str], str]:
    """The view's one query over its source table (streaming/compile.source_table_sql with
    ``rowtime``): tile, closed, side and read rows, FIXED columns then the slots' state columns.
    (temporary views to create first, in order; the query)."""
    view = compiled.view
    types = view.column_types()
    key, time_field = compiled.key_column, compiled.time_field
    derived_names = {name for name, _ in compiled.derived}
    needed = set(compiled.columns) | {key, time_field}
    for _, text in compiled.derived:
        needed |= columns_of(parse(text))
    if compiled.filter:
        needed |= columns_of(parse(compiled.filter))
    needed -= derived_names
    sql_type = {name: _SQL_TYPES[types[name]] for name in needed}
    sql_type[key], sql_type[time_field] = "STRING", "BIGINT"
    names = sorted(needed)
    fields = _quote(",".join(names))
    current = (
        "SELECT `partition` AS `_part`, `offset` AS `_off`, `value` AS `_raw`, "
        f"`key` AS `_raw_key`, `rt`, `heartbeat` AS `_hb`, "
        f"sluice_json_fields(`value`, {fields}) AS `_f` FROM `{table}`"
    )
    decoded = ", ".join(f"{_field(name, sql_type[name])} AS `{name}`" for name in names)
    current = f"SELECT `_part`, `_off`, `_raw`, `_raw_key`, `rt`, `_hb`, {decoded} FROM ({current})"
    current = f"SELECT *, `{key}` AS `_k0`, `{time_field}` AS `_t` FROM ({current})"
    for name, text in compiled.derived:
        current = f"SELECT *, {to_flink_sql(parse(text))} AS `{name}` FROM ({current})"
    keep = to_flink_sql(parse(compiled.filter)) if compiled.filter else "TRUE"
    slide = compiled.slide_ms
    end = f"`_t` - MOD(`_t`, {slide}) + {slide}"
    late = f"COALESCE(TO_TIMESTAMP_LTZ({end} - 1, 3) <= CURRENT_WATERMARK(`rt`), FALSE)"
    marked = (
        f"SELECT *, COALESCE({keep}, FALSE) AS `_kept`, `_hb` OR `_t` IS NULL OR `_k0` IS NULL "
        f"OR {late} AS `_side`, {late} AS `_late` FROM ({current})"
    )
    # The aggregated records: events the view keeps (entity and id) or drops by its filter
    # (no entity, grouped by partition: only their number and offsets travel).
    eid = (
        "CASE WHEN `_kept` THEN sluice_event_id(`_raw`) "
        "ELSE CAST(CAST(`_part` AS STRING) AS BYTES) END"
    )
    aggregated = (
        "SELECT *, CASE WHEN `_kept` THEN `_k0` ELSE CAST(NULL AS STRING) END AS `_k`, "
        f"{eid} AS `_eid` FROM `{table}_marked` WHERE NOT `_side`"
    )
    columns = [None if i is None else compiled.columns[i] for i, _ in compiled.slots]
    sums: list[tuple[str, str]] = []
    slot_sql = [
        s
        for (_, function), column in zip(compiled.slots, columns, strict=True)
        for s in _slot_sql(function, column, types.get(column) if column else None, sums)
    ]
    assert len(slot_sql) == sum(slot_widths(compiled))
    kinds = "".join(kind for kind, _ in sums)
    values = "".join(f", {x}" for _, x in sums)
    # The aggregates of the tile's events (the slots' fields of `_d` are split out below).
    aggregates = "".join(
        f", {sql} AS `a{n}`" for n, (sql, _) in enumerate(slot_sql) if "`_d`" not in sql
    )
    level1 = (
        "SELECT window_time AS `rt`, `_k`, `_part`, MIN(`_t`) AS `_t`, MAX(`_off`) AS `_off`, "
        f"COUNT(*) AS `_copies`, sluice_distinct_sums('{kinds}', `_eid`{values}) AS `_d`"
        f"{aggregates} "
        f"FROM TABLE(TUMBLE(TABLE `{table}_agg`, DESCRIPTOR(`rt`), {_interval(slide)})) "
        "GROUP BY window_start, window_end, window_time, `_k`, `_part`"
    )
    states = "".join(
        f", {sql if '`_d`' in sql else f'`a{n}`'} AS `s{n}`" for n, (sql, _) in enumerate(slot_sql)
    )
    level2 = (
        f"SELECT '{KIND_TILE}' AS `kind`, `_k` AS `k`, `_t` AS `t`, `_part` AS `part`, "
        "`_off` AS `off`, `_copies` AS `copies`, "
        "CAST(SPLIT_INDEX(`_d`, ';', 0) AS BIGINT) AS `uniq`, FALSE AS `hb`, FALSE AS `late`, "
        "CAST(NULL AS BYTES) AS `raw`, CAST(NULL AS BYTES) AS `raw_key`"
        f"{states}, `rt` FROM `{table}_l1`"
    )
    nulls = "".join(f", CAST(NULL AS {t}) AS `s{n}`" for n, (_, t) in enumerate(slot_sql))
    tiles = f"SELECT * FROM `{table}_l2`"
    # Closed rows read every aggregate of the tile aggregation (t, off and the slots not in
    # `_d`: MIN and MAX, which tile_functions.py ignores, `_d` through uniq), so that the
    # planner reuses the one aggregation for both branches instead of running a copy of it,
    # pruned to what the closed rows read, over every event. Plan 8 left out `off`, and the
    # copy was about a tenth of the JVM's samples on the replay (profiled 2026-12-07).
    shared = "".join(
        f", CAST(NULL AS {t}) AS `s{n}`" if "`_d`" in sql else f", MAX(`s{n}`) AS `s{n}`"
        for n, (sql, t) in enumerate(slot_sql)
    )
    closed = (
        f"SELECT '{KIND_CLOSED}' AS `kind`, CAST(NULL AS STRING) AS `k`, "
        "MIN(`t`) AS `t`, CAST(NULL AS INT) AS `part`, MAX(`off`) AS `off`, "
        "SUM(`copies`) AS `copies`, SUM(`uniq`) AS `uniq`, FALSE AS `hb`, FALSE AS `late`, "
        f"CAST(NULL AS BYTES) AS `raw`, CAST(NULL AS BYTES) AS `raw_key`{shared}, "
        "window_time AS `rt` "
        f"FROM TABLE(TUMBLE(TABLE `{table}_l2`, DESCRIPTOR(`rt`), {_interval(slide)})) "
        "WHERE `k` IS NOT NULL GROUP BY window_start, window_end, window_time"
    )
    side = (
        f"SELECT '{KIND_SIDE}' AS `kind`, CAST(NULL AS STRING) AS `k`, `_t` AS `t`, "
        "`_part` AS `part`, `_off` AS `off`, CAST(1 AS BIGINT) AS `copies`, "
        "CAST(1 AS BIGINT) AS `uniq`, `_hb` AS `hb`, `_late` AS `late`, `_raw` AS `raw`, "
        f"`_raw_key` AS `raw_key`{nulls}, `rt` FROM `{table}_marked` WHERE `_side`"
    )
    read = (
        f"SELECT '{KIND_READ}' AS `kind`, CAST(NULL AS STRING) AS `k`, "
        "CAST(NULL AS BIGINT) AS `t`, `partition` AS `part`, MAX(`offset`) AS `off`, "
        "COUNT(*) AS `copies`, COUNT(*) AS `uniq`, FALSE AS `hb`, FALSE AS `late`, "
        f"CAST(NULL AS BYTES) AS `raw`, CAST(NULL AS BYTES) AS `raw_key`{nulls}, "
        "CAST(window_end AS TIMESTAMP_LTZ(3)) AS `rt` "
        f"FROM TABLE(TUMBLE(TABLE `{table}`, DESCRIPTOR(`pt`), {_interval(READ_INTERVAL_MS)})) "
        "WHERE NOT `heartbeat` GROUP BY window_start, window_end, `partition`"
    )
    views = [
        f"CREATE TEMPORARY VIEW `{table}_marked` AS {marked}",
        f"CREATE TEMPORARY VIEW `{table}_agg` AS {aggregated}",
        f"CREATE TEMPORARY VIEW `{table}_l1` AS {level1}",
        f"CREATE TEMPORARY VIEW `{table}_l2` AS {level2}",
    ]
    branches = (tiles, closed, side, read)
    return views, "\nUNION ALL\n".join(branches)


def keyed_by_shard(compiled: CompiledView, query: str) -> str:
    """The tile query's rows as (shard, row): the shard of the row's entity computed in SQL
    (sluice_shard, streaming/java/sluice/Shard.java: tile_state.shard_of's CRC-32), -1 for the
    side rows, and the row's FIXED and slot columns, for a keyBy in Java (job._keyed_by_shard)."""
    columns = [*FIXED, *(f"s{n}" for n in range(sum(slot_widths(compiled))))]
    row = ", ".join(f"`{c}`" for c in columns)
    return (
        f"SELECT sluice_shard(`k`, {tile_state.SHARDS}) AS `shard`, ROW({row}) AS `row` "
        f"FROM ({query})"
    )


def state_decoder(compiled: CompiledView) -> Callable[[Sequence[Any]], list[Any]]:
    """Turns a tile row's state columns (from SLOTS_FROM on) into one partial state per slot,
    as features/aggregations.py builds them (None: the slot saw no value)."""
    types = compiled.view.column_types()
    plan: list[tuple[int, F, FieldType | None]] = []
    at = SLOTS_FROM
    for (index, function), width in zip(compiled.slots, slot_widths(compiled), strict=True):
        column = None if index is None else compiled.columns[index]
        plan.append((at, function, types[column] if column else None))
        at += width

    def decode(row: Sequence[Any]) -> list[Any]:
        states: list[Any] = []
        for at, function, field_type in plan:
            first = row[at]
            if function is F.COUNT:
                states.append(first or None)
            elif function in (F.SUM, F.MEAN):
                total = decode_sum(row[at + 1]) if first else None
                states.append(total if function is F.SUM or total is None else (first, total))
            elif function in (F.MIN, F.MAX):
                states.append(first)
            elif function is F.LAST:
                assert field_type is not None
                states.append(None if first is None else decode_last(first, field_type))
            elif function is F.STDDEV:
                states.append(None if first is None else decode_moments(first))
            else:
                values = () if first is None else orjson.loads(first) or ()
                states.append({v for v in values if v is not None} or None)
        return states

    return decode


def decode_sum(text: str) -> tuple[float, float]:
    """sluice_sum's "hi lo" (streaming/java/sluice/ExactSum.java): the exact sum as the
    compensated state (total, error) of features/aggregations.py."""
    hi, lo = text.split(" ")
    return float(hi), float(lo)


def decode_moments(text: str) -> tuple[int, float, float, float]:
    """sluice_moments' "n c d m2" as the Stddev state; float() reads the non-finite values that
    Java writes by name ("NaN", "Infinity")."""
    n, c, d, m2 = text.split(" ")
    return int(n), float(c), float(d), float(m2)
