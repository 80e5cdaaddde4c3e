"""The tile engine's Python half against the reference, without a JVM.

The SQL of streaming/tiles.py is modelled here, per (entity, slide bucket): events deduplicated
by their bytes, then each slot's columns as the query computes them (COUNT, the exact sums of
the Java ExactSum and Moments aggregates, MIN, MAX, the sortable last encoding,
ARRAY_AGG(DISTINCT)); test_flink_tile_sums.py checks the Java side of those sums.
state_decoder and WindowEngine.add_tile then build windows from those rows alone; every row must
equal the reference's. The real SQL is checked by the Flink parity suite with
SLUICE_STREAM_ENGINE=tiles.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from fractions import Fraction
from typing import Any

import orjson
import pytest

from features.aggregations import AggregationFunction as F
from features.definitions import FeatureView
from features.reference import compute_view, prepare, with_closing_rows
from features.schema import FieldType
from streaming.compile import CompiledView, compile_view
from streaming.tiles import (
    LAST_TIME_DIGITS,
    SLOTS_FROM,
    decode_last,
    decode_moments,
    decode_sum,
    slot_widths,
    state_decoder,
    tile_support,
)
from streaming.windows import Added, WindowEngine, new_state
from tests.helpers.stream import MAX_WM, STREAM_VIEWS, row_differences
from tests.unit.test_stream_windows import simulated

_LONG_MAX = 2**63 - 1


def encode_last(t: int, value: Any, field_type: FieldType) -> str:
    """What the query's MAX(CONCAT(LPAD(t), encoding)) compares, per event."""
    if field_type is FieldType.STRING:
        text = str(value)
    elif field_type is FieldType.BOOL:
        text = "TRUE" if value else "FALSE"
    elif value >= 0:
        text = "1" + str(value).rjust(19, "0")
    else:
        text = "0" + str(value + _LONG_MAX).rjust(19, "0")
    return str(t).rjust(LAST_TIME_DIGITS, "0") + text


def exact_sum_text(values: list[Any]) -> str:
    """What sluice_sum (streaming/java/sluice/ExactSum.java) returns: the exact sum rounded to a
    double, and the rest rounded."""
    exact = sum(map(Fraction, map(float, values)))
    hi = float(exact)
    return f"{hi!r} {float(exact - Fraction(hi))!r}"


def exact_moments_text(values: list[Any]) -> str:
    """What sluice_moments(x) returns (streaming/java/sluice/Moments.java): the
    state (n, c, d, M2) from the exact mean and the exact sum of squared deviations."""
    exact = [Fraction(float(v)) for v in values]
    n = len(exact)
    mean = sum(exact) / n
    c = float(mean)
    m2 = sum((x - mean) ** 2 for x in exact)
    return f"{n} {c!r} {float(mean - Fraction(c))!r} {float(m2)!r}"


def tile_row(compiled: CompiledView, events: list[dict[str, Any]]) -> list[Any]:
    """The state columns of one tile row, from the tile's distinct events in arrival order."""
    types = compiled.view.column_types()
    columns: list[Any] = []
    for index, function in compiled.slots:
        column = None if index is None else compiled.columns[index]
        values = [e.get(column) for e in events] if column else []
        present = [v for v in values if v is not None]
        if function is F.COUNT:
            columns.append(len(events))
        elif function in (F.SUM, F.MEAN):
            columns += [len(present), exact_sum_text(present) if present else None]
        elif function is F.MIN:
            columns.append(min((float(v) for v in present), default=None))
        elif function is F.MAX:
            columns.append(max((float(v) for v in present), default=None))
        elif function is F.LAST:
            assert column is not None
            encoded = [
                encode_last(e[compiled.time_field], e[column], types[column])
                for e in events
                if e.get(column) is not None
            ]
            columns.append(max(encoded, default=None))
        elif function is F.STDDEV:
            columns.append(exact_moments_text(present) if present else None)
        else:
            columns.append(orjson.dumps(list(dict.fromkeys(present))).decode())
    assert len(columns) == sum(slot_widths(compiled))
    return columns


@pytest.mark.parametrize("view", STREAM_VIEWS, ids=lambda v: v.name)
@pytest.mark.parametrize("seed", [1, 2])
def test_windows_from_tile_rows_equal_the_reference(view: FeatureView, seed: int) -> None:
    compiled = compile_view(view)
    assert tile_support(compiled) is None
    rng = random.Random(seed)
    events = simulated(2000, view.source, seed)
    repeated = events + [dict(e) for e in rng.sample(events, 100)]  # at least once
    rng.shuffle(repeated)
    kept = prepare(view, repeated)  # derived columns, filter
    # Level 1: one event per (entity, bucket, bytes); level 2: per (entity, bucket, partition).
    distinct: dict[tuple[str, int, bytes], dict[str, Any]] = {}
    slide = compiled.slide_ms
    for event in kept:
        t = event[compiled.time_field]
        raw = orjson.dumps({k: v for k, v in event.items() if k in view.source.field_names})
        distinct.setdefault((event[compiled.key_column], t - t % slide, raw), event)
    tiles: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for (key, bucket, _), event in distinct.items():
        tiles[(key, bucket, rng.randrange(2))].append(event)  # from one or two partitions
    decode = state_decoder(compiled)
    engine = WindowEngine(compiled)
    states: dict[str, list[Any]] = {}
    # Tiles arrive when their bucket closes, oldest first; rows fire at the end.
    for (key, bucket, _), tile in sorted(tiles.items(), key=lambda kv: kv[0][1]):
        row = [None] * SLOTS_FROM + tile_row(compiled, tile)
        state = states.setdefault(key, new_state())
        added = engine.add_tile(state, bucket, decode(row))
        assert added in (Added.NEW_TILE, Added.COUNTED)
    got: dict[tuple[str, int], dict[str, Any]] = {}
    for key, state in states.items():
        for end, values in engine.fire(state, MAX_WM - MAX_WM % slide):
            got[(key, end)] = values
    unique = list({orjson.dumps(e): e for e in repeated}.values())
    want = with_closing_rows(view, compute_view(view, unique))
    assert row_differences(got, want) == []


@pytest.mark.parametrize(
    ("field_type", "values"),
    [
        (FieldType.INT, [-(2**62), -5, -1, 0, 1, 7, 10, 2**62]),
        (FieldType.STRING, ["", "a", "a b", "z03", "z-00", "é", "ß"]),
        (FieldType.BOOL, [False, True]),
    ],
)
def test_last_encoding_sorts_as_the_reference_and_decodes(
    field_type: FieldType, values: list[Any]
) -> None:
    pairs = [(t, v) for t in (0, 5, 1_767_268_800_000) for v in values]
    encoded = [encode_last(t, v, field_type) for t, v in pairs]
    assert sorted(encoded) == [encode_last(t, v, field_type) for t, v in sorted(pairs)]
    assert [decode_last(e, field_type) for e in encoded] == pairs


def test_last_over_a_float_column_runs_per_event() -> None:
    view = STREAM_VIEWS[0]
    from features.definitions import Aggregation, Window

    floats = view.model_copy(
        update={
            "aggregations": (
                Aggregation(function=F.LAST, column="subtotal", windows=(Window.tumbling("5m"),)),
            )
        }
    )
    reason = tile_support(compile_view(floats))
    assert reason is not None
    assert "subtotal" in reason


def test_snapshots_of_the_two_engines_live_apart(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tile snapshot (SQL window state, tiles without ids) cannot restore the event engine's
    job or the reverse: the engine is part of the snapshot directory's name."""
    from core.settings import load_settings
    from streaming.job import job_dir

    monkeypatch.delenv("SLUICE_STREAM_ENGINE", raising=False)
    monkeypatch.delenv("SLUICE_FLINK_PYTHON_MODE", raising=False)
    settings = load_settings(state_dir=tmp_path)
    compiled = [compile_view(v) for v in STREAM_VIEWS]
    assert settings.stream_engine == "tiles-java"  # the default
    assert job_dir(settings, compiled) == job_dir(settings, compiled, "tiles-java")
    assert job_dir(settings, compiled, "tiles") != job_dir(settings, compiled, "events")
    assert job_dir(settings, compiled, "tiles") != job_dir(settings, compiled, "tiles-java")
    events = load_settings(state_dir=tmp_path, stream_engine="events")
    assert job_dir(events, compiled) == job_dir(settings, compiled, "events")
    # Python state has other serializers in thread mode: a snapshot of its own.
    assert job_dir(settings, compiled) == job_dir(settings, compiled, python_mode="thread")
    process = job_dir(settings, compiled, python_mode="process")
    assert process != job_dir(settings, compiled)
    assert process == job_dir(
        load_settings(state_dir=tmp_path, flink_python_mode="process"), compiled
    )


def test_a_new_tile_plan_starts_in_a_snapshot_directory_of_its_own(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flink cannot restore a snapshot of an older tile query's plan (streaming/tiles.py,
    PLAN_VERSION): a new plan starts afresh, the event engine's directory stays."""
    from core.settings import load_settings
    from streaming import tiles
    from streaming.job import job_dir

    settings = load_settings(state_dir=tmp_path)
    compiled = [compile_view(v) for v in STREAM_VIEWS]
    before = job_dir(settings, compiled, "tiles"), job_dir(settings, compiled, "events")
    monkeypatch.setattr(tiles, "PLAN_VERSION", tiles.PLAN_VERSION + 1)
    assert job_dir(settings, compiled, "tiles") != before[0]
    assert job_dir(settings, compiled, "events") == before[1]


def test_exact_sum_and_moments_texts_decode_as_java_writes_them() -> None:
    # Java's Double.toString: exponents as "E", non-finite values by name.
    assert decode_sum("1.0E16 -1.0") == (1e16, -1.0)
    assert decode_sum("370383.067000075 2.3398900122339395E-12") == (
        370383.067000075,
        2.3398900122339395e-12,
    )
    total, error = decode_sum("Infinity 0.0")
    assert math.isinf(total)
    assert error == 0.0
    n, c, d, m2 = decode_moments("3 NaN 0.0 NaN")
    assert (n, d) == (3, 0.0)
    assert math.isnan(c)
    assert math.isnan(m2)
    assert decode_moments("2 1.5 -1.0E-17 0.5") == (2, 1.5, -1e-17, 0.5)


@pytest.mark.parametrize("view", STREAM_VIEWS, ids=lambda v: v.name)
def test_event_time_column_and_query_decode_the_time_field_alike(view: FeatureView) -> None:
    """The watermark's event time and the tiles' time come from one parse function and one
    cast: a record whose time the query can read has that time as its event time."""
    from streaming.tiles import rowtime_column, tile_query

    compiled = compile_view(view)
    name = compiled.time_field
    rowtime = rowtime_column(compiled)
    views, query = tile_query(compiled, "src")
    assert f"TRY_CAST(sluice_json_fields(`value`, '{name}').`{name}` AS BIGINT)" in rowtime
    assert f"TRY_CAST(`_f`.`{name}` AS BIGINT) AS `{name}`" in " ".join([*views, query])
    assert "JSON_VALUE" not in rowtime + " ".join([*views, query])
    # Duplicates are found by the id of the record's bytes, not of a decoded text.
    assert "sluice_event_id(`_raw`)" in " ".join(views)
    assert "MD5" not in " ".join(views)
