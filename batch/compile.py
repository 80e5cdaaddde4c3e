"""Compile a FeatureView to a Spark DataFrame of window rows.

``compile_view`` returns exactly the rows of
``reference.with_closing_rows(view, reference.compute_view(view, events))``: one row per
(entity, window end) whose largest window holds an event, plus one "closing" row of empty
values at the first empty end after each run of busy ends.

Input events are canonical events: one column per source field. The event-time column is a
Spark timestamp (as the parquet history stores it: ``timestamp[ms, UTC]``); epoch milliseconds
(a long column, as canonical JSON carries them) are accepted too. Key nulls are dropped (the
validating ingest never lets them through).

Algorithm (tiles), chosen because sliding windows overlap ``size / slide`` times:
  1. derived columns, then the filter, per event (SQL rendered by features.expressions);
  2. tiles: group events by (key, bucket = floor(t / slide)) into mergeable partials (count,
     sum, min, max, the greatest (t, value) for last, the set of distinct values, and for
     stddev the tile's count, mean and M2, computed two-pass over its values): the partial
     states of features/aggregations.py, as Spark columns;
  3. each tile is exploded into the ``n + 1`` window ends ``bucket + 1 .. bucket + n + 1``
     (n = largest size / slide); a tile belongs to the window of size S ending at e iff
     ``bucket >= e - S / slide``;
  4. group by (key, end) and merge the partials of the tiles that belong to each window;
  5. each feature's result from its merged columns, then its empty value (from
     features/aggregations.py) where the window held nothing, cast to the feature's type.
The extra end ``bucket + n + 1`` is the closing row: there the tile belongs to no window, so
unless another tile is in range every feature merges nothing and takes its empty value. That is
exactly with_closing_rows's rule (a row at e + slide iff e has a row and e + slide has none)
without a window function over the output.

stddev merges per-tile (count, mean, M2) relative to a shift that is a data value, instead of
sums of squares, which lose every digit when the mean is large against the spread (_stddev).

Per function, ``_BUILDERS`` says how to build these columns (partial, merge, result, and a
``direct`` aggregate of raw values for baselines without tiles); a function without an entry
raises UnsupportedAggregationError before anything runs.

Where tiles pay (bench/backfill.py against exploding every event): Spark's map-side partial
aggregation already collapses the exploded rows of dense keys, so the gain comes from windows
long against the slide (30d every 1d: about 3x) and from count_distinct; keys with about one
event per slide make tiles cost one extra shuffle of the events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from batch.errors import EventSchemaError, UnsupportedAggregationError
from features.aggregations import AGGREGATIONS
from features.definitions import AggregationFunction, FeatureSpec, FeatureView
from features.expressions import Binary, Call, Column, Expr, Unary, parse, to_sql
from features.schema import FieldType

if TYPE_CHECKING:
    from pyspark.sql import Column as SparkColumn
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import DataType

Agg = AggregationFunction

# Internal column names start with "__": definitions only allow names starting with a letter.
KEY, TIME, BUCKET, END = "__key", "__t", "__bucket", "__end"
EVENT_TIMESTAMP = "event_timestamp"


def spark_type(field_type: FieldType) -> DataType:
    """The Spark type of a field (or feature) type."""
    from pyspark.sql import types as st

    return {
        FieldType.STRING: st.StringType(),
        FieldType.INT: st.LongType(),
        FieldType.FLOAT: st.DoubleType(),
        FieldType.BOOL: st.BooleanType(),
        FieldType.TIMESTAMP: st.TimestampType(),
    }[field_type]


@dataclass(frozen=True)
class _Compiled:
    """How Spark computes one feature, in the steps of features/aggregations.py.

    ``partials``: tile partials (name -> aggregate over a tile's events), with optional
    per-tile columns computed from them (``tile``, name -> column; the ``scratch`` partials
    they read are then dropped, before tiles are exploded). ``merge``: merged columns (name ->
    aggregate over a window's tiles, given "this tile is in the window"). ``result``: the value
    from the merged columns; null for an empty window, which then takes the function's empty
    value. ``direct``: the value in one aggregate over raw event rows, given "this row is in
    the window" (Spark's built-ins; bench/backfill.py's baseline without tiles).
    """

    partials: dict[str, Callable[[], SparkColumn]]
    merge: dict[str, Callable[[SparkColumn], SparkColumn]]
    result: Callable[[], SparkColumn]
    direct: Callable[[SparkColumn], SparkColumn]
    tile: dict[str, Callable[[], SparkColumn]] = field(default_factory=dict)
    scratch: frozenset[str] = frozenset()
    # Columns of the exploded rows computed over each (key, end) group by a window function,
    # given "this tile is in the window" (stddev's reference shift).
    per_window: dict[str, Callable[[SparkColumn], SparkColumn]] = field(default_factory=dict)


def compile_view(
    spark: SparkSession,
    view: FeatureView,
    events: DataFrame,
    *,
    end_range: tuple[int, int] | None = None,
) -> DataFrame:
    """The view's window rows: ``<join_key>`` (string), ``event_timestamp`` (window end),
    then one column per feature in ``view.features()`` order.

    ``end_range`` (epoch ms, ``[lo, hi)``) keeps only windows ending in it; backfills compute
    a day range from events that start one largest window (plus a slide) earlier.
    Raises UnsupportedAggregationError (before running anything) for an aggregation this
    compiler cannot express, EventSchemaError when ``events`` lacks a column the view reads.
    """
    del spark  # the plan is built from ``events``; kept for the engines' common signature
    from pyspark.sql import functions as sf
    from pyspark.sql.window import Window

    specs = view.features()
    compiled = [_compile_feature(view, spec) for spec in specs]
    slide = view.slide_ms
    n_max = view.max_window.size_ms // slide

    rows = prepare_events(view, events)
    partials: dict[str, Callable[[], SparkColumn]] = {}
    per_tile: dict[str, Callable[[], SparkColumn]] = {}
    scratch: set[str] = set()
    for feature in compiled:
        partials |= feature.partials
        per_tile |= feature.tile
        scratch |= feature.scratch
    tiles = rows.groupBy(KEY, BUCKET).agg(*(make().alias(name) for name, make in partials.items()))
    if per_tile:
        kept = [sf.col(c) for c in tiles.columns if c not in scratch]
        tiles = tiles.select(*kept, *(make().alias(name) for name, make in per_tile.items()))

    ends = tiles.withColumn(
        END, sf.explode(sf.sequence(sf.col(BUCKET) + 1, sf.col(BUCKET) + n_max + 1))
    )
    if end_range is not None:
        lo, hi = _end_buckets(end_range, slide)
        ends = ends.where((sf.col(END) >= lo) & (sf.col(END) < hi))

    def in_window(spec: FeatureSpec) -> SparkColumn:
        return sf.col(BUCKET) >= sf.col(END) - spec.window.size_ms // slide

    per_window = [
        make(in_window(spec)).over(Window.partitionBy(KEY, END)).alias(name)
        for spec, feature in zip(specs, compiled, strict=True)
        for name, make in feature.per_window.items()
    ]
    if per_window:  # the group-by below reuses this partitioning: no second shuffle
        ends = ends.select("*", *per_window)
    merged = [
        make(in_window(spec)).alias(name)
        for spec, feature in zip(specs, compiled, strict=True)
        for name, make in feature.merge.items()
    ]
    windows = ends.groupBy(KEY, END).agg(*merged)
    return windows.select(
        sf.col(KEY).alias(view.entity.join_key),
        sf.timestamp_millis(sf.col(END) * slide).alias(EVENT_TIMESTAMP),
        *(
            _finish(spec, feature.result()).alias(spec.name)
            for spec, feature in zip(specs, compiled, strict=True)
        ),
    )


def direct_feature(view: FeatureView, spec: FeatureSpec, inside: SparkColumn) -> SparkColumn:
    """One feature as a single aggregate over raw event rows (``prepare_events`` rows, with
    ``inside`` saying which rows are in the window), without tiles: for baselines."""
    return _finish(spec, _compile_feature(view, spec).direct(inside))


def _finish(spec: FeatureSpec, value: SparkColumn) -> SparkColumn:
    """A feature's value, its empty value where it is null (features/aggregations.py), typed."""
    from pyspark.sql import functions as sf

    empty = AGGREGATIONS[spec.function].empty
    if empty is not None:
        value = sf.coalesce(value, sf.lit(empty))
    return value.cast(spark_type(spec.dtype))


def prepare_events(view: FeatureView, events: DataFrame) -> DataFrame:
    """Derived columns, the filter, then ``__key``, ``__t`` (epoch ms), ``__bucket`` and the
    columns that aggregations read: the rows that enter windows."""
    from pyspark.sql import functions as sf

    check_events(view, events)
    rows = events
    for name, text in view.derived.items():
        rows = rows.withColumn(name, sf.expr(to_sql(parse(text))))
    if view.filter is not None:
        # SQL semantics like the reference: rows where the filter is null are dropped too.
        rows = rows.where(sf.expr(to_sql(parse(view.filter))))
    time = epoch_ms(events, view.source.event_time_field)
    columns = sorted({spec.column for spec in view.features() if spec.column})
    return (
        rows.select(sf.col(view.key_column).cast("string").alias(KEY), time.alias(TIME), *columns)
        .where(sf.col(KEY).isNotNull() & sf.col(TIME).isNotNull())
        # Integer floor division that is exact for any sign (Spark's div truncates to zero).
        .withColumn(
            BUCKET, sf.expr(f"({TIME} - pmod({TIME}, {view.slide_ms})) div {view.slide_ms}")
        )
    )


def epoch_ms(events: DataFrame, column: str) -> SparkColumn:
    """A timestamp (or already epoch-ms integer) column as epoch milliseconds."""
    from pyspark.sql import functions as sf
    from pyspark.sql.types import IntegerType, LongType, TimestampType

    dtype = events.schema[column].dataType
    if isinstance(dtype, TimestampType):
        return sf.unix_millis(sf.col(column))
    if isinstance(dtype, LongType | IntegerType):
        return sf.col(column).cast("bigint")
    raise EventSchemaError("events", column, f"event time must be a timestamp, not {dtype}")


def check_events(view: FeatureView, events: DataFrame) -> None:
    """Raise EventSchemaError naming the first column the view reads that ``events`` lacks."""
    present = set(events.columns)
    needed = {view.key_column, view.source.event_time_field}
    for text in [*view.derived.values(), *([view.filter] if view.filter else [])]:
        needed |= _referenced(parse(text))
    needed |= {spec.column for spec in view.features() if spec.column}
    for name in sorted(needed - set(view.derived) - present):
        raise EventSchemaError(f"events of view {view.name!r}", name, "missing")


def _referenced(expr: Expr) -> set[str]:
    if isinstance(expr, Column):
        return {expr.name}
    if isinstance(expr, Unary):
        return _referenced(expr.operand)
    if isinstance(expr, Binary):
        return _referenced(expr.left) | _referenced(expr.right)
    if isinstance(expr, Call):
        return set().union(*(_referenced(a) for a in expr.args))
    return set()


def _end_buckets(end_range: tuple[int, int], slide: int) -> tuple[int, int]:
    """[lo, hi) in epoch ms as [first, stop) end buckets (ends are multiples of the slide)."""
    lo, hi = end_range
    return -(-lo // slide), -(-hi // slide)


def _compile_feature(view: FeatureView, spec: FeatureSpec) -> _Compiled:
    builder = _BUILDERS.get(spec.function)
    if builder is None:
        raise UnsupportedAggregationError(
            view.name, spec.name, f"Spark cannot compute {spec.function.value!r}"
        )
    if AGGREGATIONS[spec.function].reads_column and spec.column is None:
        raise UnsupportedAggregationError(view.name, spec.name, "needs a column")
    return builder(spec)


def _merged(spec: FeatureSpec, part: str = "") -> str:
    """Name of a merged column of one feature (unique: feature names are)."""
    return f"__m_{spec.name}{part}"


def _count(spec: FeatureSpec) -> _Compiled:
    from pyspark.sql import functions as sf

    # count counts events, null values included (reads_column is False).
    merged = _merged(spec)
    return _Compiled(
        {"__n": lambda: sf.count(sf.lit(1))},
        {merged: lambda inside: sf.sum(sf.when(inside, sf.col("__n")))},
        lambda: sf.col(merged),
        lambda inside: sf.count(sf.when(inside, sf.lit(1))),
    )


def _value(spec: FeatureSpec) -> SparkColumn:
    from pyspark.sql import functions as sf

    return sf.col(str(spec.column)).cast("double")


def _sum_parts(spec: FeatureSpec) -> dict[str, Callable[[], SparkColumn]]:
    from pyspark.sql import functions as sf

    c = spec.column
    return {
        f"__cnt_{c}": lambda: sf.count(_value(spec)),
        f"__sum_{c}": lambda: sf.sum(_value(spec)),
    }


def _sum(spec: FeatureSpec) -> _Compiled:
    from pyspark.sql import functions as sf

    total, merged = sf.col(f"__sum_{spec.column}"), _merged(spec)
    return _Compiled(
        _sum_parts(spec),
        {merged: lambda inside: sf.sum(sf.when(inside, total))},
        lambda: sf.col(merged),
        lambda inside: sf.sum(sf.when(inside, _value(spec))),
    )


def _mean(spec: FeatureSpec) -> _Compiled:
    from pyspark.sql import functions as sf

    count, total = sf.col(f"__cnt_{spec.column}"), sf.col(f"__sum_{spec.column}")
    n, s = _merged(spec, "_n"), _merged(spec, "_s")
    return _Compiled(
        _sum_parts(spec),
        {
            n: lambda inside: sf.sum(sf.when(inside, count)),
            s: lambda inside: sf.sum(sf.when(inside, total)),
        },
        lambda: sf.when(sf.col(n) > 0, sf.col(s) / sf.col(n)),
        lambda inside: sf.avg(sf.when(inside, _value(spec))),
    )


def _extreme(spec: FeatureSpec) -> _Compiled:
    from pyspark.sql import functions as sf

    kind = "min" if spec.function is Agg.MIN else "max"
    tile = sf.min if kind == "min" else sf.max
    name, merged = f"__{kind}_{spec.column}", _merged(spec)
    return _Compiled(
        {name: lambda: tile(_value(spec))},
        {merged: lambda inside: tile(sf.when(inside, sf.col(name)))},
        lambda: sf.col(merged),
        lambda inside: tile(sf.when(inside, _value(spec))),
    )


def _last(spec: FeatureSpec) -> _Compiled:
    from pyspark.sql import functions as sf

    # Structs compare field by field: the greatest (event time, value) is the last value, and
    # ties in event time go to the greatest value, as features/aggregations.py requires.
    name, column, merged = f"__last_{spec.column}", sf.col(str(spec.column)), _merged(spec)
    present = sf.when(column.isNotNull(), sf.struct(sf.col(TIME).alias("t"), column.alias("v")))
    return _Compiled(
        {name: lambda: sf.max(present)},
        {merged: lambda inside: sf.max(sf.when(inside, sf.col(name)))},
        lambda: sf.col(merged).getField("v"),
        lambda inside: sf.max(sf.when(inside, present)).getField("v"),
    )


def _stddev(spec: FeatureSpec) -> _Compiled:
    """Sample stddev, exact enough for a large mean with a small spread.

    Sums of squares lose every digit when the mean is large against the spread, and so does
    merging tiles by their means: a mean's rounding error (an ulp) is no longer small against
    the differences between means. So every mean is kept relative to a shift that is one of the
    data values (exact): a tile stores (n, c, d, q) with c one of its values, d its mean's offset
    from c and q its M2 (two-pass over its values), the fields of the Python state in
    features/aggregations.py. A window takes the c of one of its tiles as reference r (a window
    function over the exploded rows) and sums, per tile, n * o and q + n * o^2 with
    o = (c - r) + d, the tile mean's offset from r: c - r is exact when the two are close
    (Sterbenz), and M2 = S2 - S1^2 / N cancels only as much as (mean - r)^2 exceeds the
    variance, which a data value of the window keeps small. (Chan's pairwise merge, which the
    Python state uses, has no Spark aggregate; these sums are its closed form.)
    """
    from pyspark.sql import functions as sf

    values, stats, ref = f"__vals_{spec.column}", f"__sd_{spec.column}", f"__ref_{spec.name}"
    count, s1, s2 = _merged(spec, "_n"), _merged(spec, "_s1"), _merged(spec, "_s2")

    def tile_stats() -> SparkColumn:
        vals = sf.col(values)
        n = sf.size(vals).cast("double")
        shift = sf.try_element_at(vals, sf.lit(1))
        offset = sf.aggregate(vals, sf.lit(0.0), lambda acc, x: acc + (x - shift)) / n
        m2 = sf.aggregate(
            vals, sf.lit(0.0), lambda acc, x: acc + (x - shift - offset) * (x - shift - offset)
        )
        parts = (n.alias("n"), shift.alias("c"), offset.alias("d"), m2.alias("q"))
        return sf.when(n > 0, sf.struct(*parts))  # null for a tile of null values only

    def reference(inside: SparkColumn) -> SparkColumn:
        return sf.first(sf.when(inside, sf.col(stats)["c"]), ignorenulls=True)

    tile = sf.col(stats)
    n, offset = tile["n"], (tile["c"] - sf.col(ref)) + tile["d"]

    def result() -> SparkColumn:
        m2 = sf.greatest(sf.col(s2) - sf.col(s1) * sf.col(s1) / sf.col(count), sf.lit(0.0))
        return sf.when(sf.col(count) >= 2, sf.sqrt(m2 / (sf.col(count) - 1)))

    return _Compiled(
        {values: lambda: sf.collect_list(_value(spec))},  # nulls skipped
        {
            count: lambda inside: sf.sum(sf.when(inside, n)),
            s1: lambda inside: sf.sum(sf.when(inside, n * offset)),
            s2: lambda inside: sf.sum(sf.when(inside, tile["q"] + n * offset * offset)),
        },
        result,
        lambda inside: sf.stddev_samp(sf.when(inside, _value(spec))),
        tile={stats: tile_stats},
        scratch=frozenset({values}),
        per_window={ref: reference},
    )


def _count_distinct(spec: FeatureSpec) -> _Compiled:
    from pyspark.sql import functions as sf

    name, merged, column = f"__set_{spec.column}", _merged(spec), sf.col(str(spec.column))
    return _Compiled(
        {name: lambda: sf.collect_set(column)},  # skips nulls
        {merged: lambda inside: sf.flatten(sf.collect_list(sf.when(inside, sf.col(name))))},
        lambda: sf.size(sf.array_distinct(sf.col(merged))),
        lambda inside: sf.count_distinct(sf.when(inside, column)),
    )


# How Spark computes each aggregation function. A function missing here fails compile_view
# with UnsupportedAggregationError; adding one to features/aggregations.py means adding it here.
_BUILDERS: dict[AggregationFunction, Callable[[FeatureSpec], _Compiled]] = {
    Agg.COUNT: _count,
    Agg.SUM: _sum,
    Agg.MEAN: _mean,
    Agg.MIN: _extreme,
    Agg.MAX: _extreme,
    Agg.LAST: _last,
    Agg.STDDEV: _stddev,
    Agg.COUNT_DISTINCT: _count_distinct,
}
