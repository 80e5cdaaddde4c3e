"""Window assembly in the JVM (streaming/java/sluice/WindowAssembler.java) against the Python
engine (streaming/windows.WindowEngine, as the tile function runs it: ordered tiles, memo and
queues), on the same tile rows: the tile SQL's state columns, built from simulated events as
tests/unit/test_stream_tiles.py models the query. Tiles arrive before the watermark passes
their end, several per bucket (partitions), and firings come at random watermark steps
(several ends at once, as when a job catches up), then at the end of the input. Every row of
every entity must be the Python engine's, in order, with its values equal: the Java merges and
results are the Python ones operation for operation. A JDK runs sluice.WindowsCheck; no Flink
cluster."""

from __future__ import annotations

import math
import random
import subprocess
from collections import defaultdict
from fractions import Fraction
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.records import FeatureRow
from features.definitions import FeatureView, Window
from features.reference import prepare
from streaming.compile import CompiledView, compile_view
from streaming.java_windows import window_plan
from streaming.tiles import SLOTS_FROM, decode_moments, decode_sum, state_decoder, tile_support
from streaming.windows import Memo, Queues, SortedTiles, WindowEngine, prune_memo
from tests.helpers.stream import MAX_WM, STREAM_VIEWS
from tests.unit.test_stream_tile_state import view as all_functions
from tests.unit.test_stream_tiles import tile_row
from tests.unit.test_stream_windows import simulated

pytestmark = [pytest.mark.integration, pytest.mark.flink]

# Every function, and a window of 300 slides: past QUEUE_FROM_TILES, so assembled by queues.
LONG = all_functions((Window.sliding("1m", "1m"), Window.sliding("10m", "1m"),
                      Window.sliding("5h", "1m")))  # fmt: skip
VIEWS = (*STREAM_VIEWS, LONG)

Ops = list[list[Any]]
Rows = dict[str, list[tuple[int, dict[str, Any]]]]


@pytest.fixture(scope="module")
def classpath(tmp_path_factory: pytest.TempPathFactory) -> str:
    import pyflink

    from streaming.udf import udf_jar

    jar = udf_jar(Path(tmp_path_factory.mktemp("udf")))
    lib = Path(pyflink.__file__).resolve().parent / "lib"
    return f"{jar}:{lib}/*"


def scenario(view: FeatureView, compiled: CompiledView, seed: int) -> Ops:
    """Tile rows and firings, in an order a job could see them."""
    rng = random.Random(seed)
    kept = prepare(view, simulated(1500, view.source, seed))
    slide = compiled.slide_ms
    tiles: dict[tuple[int, str, int], list[dict[str, Any]]] = defaultdict(list)
    for event in kept:
        t = event[compiled.time_field]
        tiles[(t - t % slide, event[compiled.key_column], rng.randrange(3))].append(event)
    ops: Ops = []
    entities: set[str] = set()
    watermark = None
    for (bucket, entity, _), events in sorted(tiles.items()):
        if bucket != watermark and rng.random() < 0.3:
            # Every end up to the bucket's start is final: the tile's end is not.
            ops += [["fire", e, bucket] for e in sorted(entities)]
            watermark = bucket
        entities.add(entity)
        ops.append(["tile", entity, bucket, tile_row(compiled, events)])
    ops += [["fire", e, MAX_WM] for e in sorted(entities)]
    return ops


def python_rows(compiled: CompiledView, ops: Ops) -> Rows:
    engine = WindowEngine(compiled)
    decode = state_decoder(compiled)
    states: dict[str, list[Any]] = {}
    caches: dict[str, tuple[Memo, Queues]] = defaultdict(lambda: ({}, {}))
    rows: Rows = defaultdict(list)
    for op in ops:
        state = states.setdefault(op[1], [None, SortedTiles()])
        if op[0] == "tile":
            engine.add_tile(state, op[2], decode([None] * SLOTS_FROM + op[3]))
            continue
        memo, queues = caches[op[1]]
        rows[op[1]] += engine.fire(state, op[2], memo, queues)
        prune_memo(memo, state)
    return rows


def java_rows(classpath: str, compiled: CompiledView, ops: Ops) -> Rows:
    lines = [window_plan(compiled), *(orjson.dumps(op).decode() for op in ops)]
    done = subprocess.run(
        ["java", "-cp", classpath, "sluice.WindowsCheck"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows: Rows = defaultdict(list)
    for line in done.stdout.splitlines():
        row = FeatureRow.decode(line.encode())
        assert row.view == compiled.name
        rows[row.entity_key].append((row.window_end_ms, dict(row.values)))
    return rows


def differences(got: Rows, want: Rows) -> list[str]:
    problems = []
    for entity in sorted(set(got) | set(want)):
        mine, theirs = got.get(entity, []), want.get(entity, [])
        if [end for end, _ in mine] != [end for end, _ in theirs]:
            problems.append(f"{entity}: ends {len(mine)} against {len(theirs)}")
            continue
        for (end, a), (_, b) in zip(mine, theirs, strict=True):
            for name in b:
                x, y = a.get(name), b[name]
                same = (
                    math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-12)
                    if isinstance(y, float) and isinstance(x, float)
                    else (x == y and type(x) is type(y))
                )
                if not same or a.keys() != b.keys():
                    problems.append(f"{entity} at {end}: {name} {x!r} against {y!r}")
    return problems


@pytest.mark.parametrize("view", VIEWS, ids=[*(v.name for v in STREAM_VIEWS), "every-function-5h"])
@pytest.mark.parametrize("seed", [1, 2])
def test_java_windows_equal_the_python_engine(classpath: str, view: FeatureView, seed: int) -> None:
    compiled = compile_view(view)
    assert tile_support(compiled) is None
    ops = scenario(view, compiled, seed)
    want = python_rows(compiled, ops)
    assert sum(map(len, want.values())) > 100  # windows of several tiles, closing rows
    assert differences(java_rows(classpath, compiled, ops), want) == []


def test_entity_keys_that_json_escapes_come_back_whole(classpath: str) -> None:
    """The feature rows' JSON (FeatureRows.java) escapes quotes, backslashes and control
    characters in an entity key and passes the rest through, as orjson reads it back."""
    view = STREAM_VIEWS[0]
    compiled = compile_view(view)
    ops = scenario(view, compiled, 1)
    odd = ['"', "\\", 'a"b\\c', "tab\tnew\nline\x01\x1f", "zone-ü-€-😀", "", "plain"]
    names = {e: f"{odd[i % len(odd)]}{i}" for i, e in enumerate(sorted({op[1] for op in ops}))}
    ops = [[op[0], names[op[1]], *op[2:]] for op in ops]
    want = python_rows(compiled, ops)
    assert set(want) == set(names.values())
    assert differences(java_rows(classpath, compiled, ops), want) == []


def random_double(rng: random.Random) -> float:
    """Subnormals, everyday values, exact ties and cancellations, and a wide range."""
    kind = rng.randrange(5)
    if kind == 0:
        return rng.getrandbits(52) * 2.0**-1074 * rng.choice((1, -1))  # subnormal
    if kind == 1:
        return rng.uniform(-1e3, 1e3)
    if kind == 2:
        return rng.choice((0.1, 0.2, 7.8, -7.8, 1e16, -1e16, 1.0, 2.0**-1022, 0.0, -0.0))
    if kind == 3:
        return rng.randint(-10, 10) * 0.5
    # Up to 1e150: squares and their sums stay finite (an overflow is not compared here).
    return rng.uniform(-1.0, 1.0) * 10.0 ** rng.randint(-320, 150)


def test_exact_sums_and_moments_round_the_exact_values_once(classpath: str) -> None:
    """ExactSum and Moments (streaming/java/sluice/BinarySum.java) against rational arithmetic:
    hi, lo, c, d and M2 are each the exact value rounded to the nearest double."""
    rng = random.Random(3)
    sets = [[random_double(rng) for _ in range(rng.randint(1, 8))] for _ in range(2_000)]
    sets += [[5e-324, 5e-324], [5e-324, -1e-323, 2.5e-323], [0.1] * 10, [1e16, 1.0, -1e16]]
    done = subprocess.run(
        ["java", "-cp", classpath, "sluice.SumsCheck"],
        input="".join(" ".join(map(repr, s)) + "\n" for s in sets),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == len(sets)
    for values, line in zip(sets, lines, strict=True):
        exact = [Fraction(v) for v in values]
        total = sum(exact, Fraction(0))
        mean = total / len(exact)
        m2 = sum(((x - mean) ** 2 for x in exact), Fraction(0))
        sum_text, moments_text = line.split("|")
        expected_sum = (float(total), float(total - Fraction(float(total))))
        assert decode_sum(sum_text) == expected_sum, (values, line)
        c = float(mean)
        expected = (len(values), c, float(mean - Fraction(c)), float(m2))
        assert decode_moments(moments_text) == expected, (values, line)
