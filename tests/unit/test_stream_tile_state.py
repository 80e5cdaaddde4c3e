"""The tile engine's keyed state (streaming/tile_state.py) and incremental long windows
(streaming/windows.WindowQueue) against the plain path (one pickled state per key, every window
merged from its tiles), on random tiles: out of order within the open ones, tiles leaving the
window, caches dropped (a restore: the state rebuilt from the stored form) and keys pushed out
of a small cache. No JVM: the Flink states are dicts."""

from __future__ import annotations

import math
import pickle
import random
from collections.abc import Callable
from typing import Any

import pytest

from examples.delivery.features import restaurant_orders
from features.aggregations import AGGREGATIONS
from features.definitions import Aggregation, AggregationFunction, FeatureView, Window
from streaming import windows
from streaming.compile import (
    EVENT_ENGINE_MAX_TILES,
    CompiledView,
    check_event_engine,
    compile_view,
)
from streaming.errors import UnsupportedViewError
from streaming.tile_state import KeyStates, WholeKeyStates, uses_map_state
from streaming.windows import WindowEngine, new_state, prune_memo

F = AggregationFunction
MINUTE = 60_000


class FakeMap:
    """PyFlink's MapState of the current key, stored pickled (as Flink does)."""

    def __init__(self) -> None:
        self.by_key: dict[str, dict[int, bytes]] = {}
        self.key = ""

    def _map(self) -> dict[int, bytes]:
        return self.by_key.setdefault(self.key, {})

    def put(self, bucket: int, tile: Any) -> None:
        self._map()[bucket] = pickle.dumps(tile)

    def remove(self, bucket: int) -> None:
        del self._map()[bucket]

    def items(self) -> list[tuple[int, Any]]:
        return [(b, pickle.loads(v)) for b, v in self._map().items()]

    def clear(self) -> None:
        self.by_key.pop(self.key, None)


class FakeValue:
    def __init__(self) -> None:
        self.by_key: dict[str, Any] = {}
        self.key = ""

    def value(self) -> Any:
        stored = self.by_key.get(self.key)
        return None if stored is None else pickle.loads(stored)

    def update(self, value: Any) -> None:
        self.by_key[self.key] = pickle.dumps(value)

    def clear(self) -> None:
        self.by_key.pop(self.key, None)


def view(windows_: tuple[Window, ...]) -> FeatureView:
    functions = (
        (F.COUNT, None),
        (F.SUM, "subtotal"),
        (F.MEAN, "subtotal"),
        (F.MIN, "distance_km"),
        (F.MAX, "distance_km"),
        (F.LAST, "items"),
        (F.STDDEV, "subtotal"),
        (F.COUNT_DISTINCT, "zone_id"),
    )
    return restaurant_orders.model_copy(
        update={
            "aggregations": tuple(
                Aggregation(function=f, column=c, windows=windows_) for f, c in functions
            )
        }
    )


def random_tile(compiled: CompiledView, rng: random.Random, bucket: int) -> list[Any]:
    """One tile row's partial states: a few events, some values null."""
    columns: dict[str, Callable[[], Any]] = {
        "subtotal": lambda: rng.choice([None, rng.uniform(0, 1e4), 1e9 + rng.random()]),
        "distance_km": lambda: rng.choice([None, round(rng.uniform(0, 100), 1)]),
        "items": lambda: rng.randint(1, 5),
        "zone_id": lambda: rng.choice(["z1", "z2", "z3", "z4", "z5", None]),
    }
    events = [
        (bucket + rng.randrange(MINUTE), {c: f() for c, f in columns.items()})
        for _ in range(rng.randint(1, 4))
    ]
    states = []
    for index, function in compiled.slots:
        column = None if index is None else compiled.columns[index]
        states.append(
            AGGREGATIONS[function].of((t, None if column is None else v[column]) for t, v in events)
        )
    return states


def same_rows(a: list[Any], b: list[Any]) -> None:
    assert [end for end, _ in a] == [end for end, _ in b]
    for (end, x), (_, y) in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for name in x:
            if isinstance(x[name], float) and isinstance(y[name], float):
                assert math.isclose(x[name], y[name], rel_tol=1e-12, abs_tol=1e-9), (end, name)
            else:
                assert x[name] == y[name], (end, name, x[name], y[name])


@pytest.mark.parametrize(("layout", "seed"), [("map", 1), ("map", 2), ("map", 3), ("whole", 4)])
def test_both_layouts_and_window_queues_give_the_rows_of_the_plain_path(layout, seed, monkeypatch):
    # Queues from 3 tiles, so that 10- and 25-minute windows use them (30 days would be slow
    # on the plain path); the 1-minute window stays on the plain path beside them.
    monkeypatch.setattr(windows, "QUEUE_FROM_TILES", 3)
    compiled = compile_view(
        view((Window.sliding("1m", "1m"), Window.sliding("10m", "1m"), Window.sliding("25m", "1m")))
    )
    rng = random.Random(seed)
    engine = WindowEngine(compiled)
    tiles, next_end = FakeMap(), FakeValue()
    capacity = rng.choice([30, 10_000])

    def layout_states() -> KeyStates | WholeKeyStates:
        if layout == "map":
            return KeyStates(tiles, next_end, capacity=capacity)
        return WholeKeyStates(next_end)  # the whole state as one pickled value

    states = layout_states()
    plain: dict[str, bytes] = {}  # the old layout: one pickled state per key
    keys = ["a", "b", "c"]
    watermark = 0
    restores = fired = reads = 0
    for step in range(400):
        key = rng.choice(keys)
        tiles.key = next_end.key = key
        cached = states.get(key)
        old = pickle.loads(plain[key]) if key in plain else new_state()
        assert cached.state[0] == old[0]
        assert cached.state[1] == old[1]
        if rng.random() < 0.7:
            # A tile row for an open bucket, in any order (several per bucket merge).
            first_open = max(watermark - watermark % MINUTE, old[0] or 0)
            # Gaps of up to an hour: tiles leave the 25-minute window with nothing after them.
            bucket = first_open + MINUTE * rng.choice([0, 1, 2, 3, rng.randrange(60)])
            row = random_tile(compiled, rng, bucket)
            copied = [s.copy() if isinstance(s, set) else s for s in row]
            engine.add_tile(cached.state, bucket, copied)
            states.tile_changed(key, cached, bucket)
            engine.add_tile(old, bucket, row)
        else:
            watermark += rng.choice([0, MINUTE // 2, MINUTE, 5 * MINUTE, 40 * MINUTE])
            expected = engine.fire(old, watermark)
            got = engine.fire(cached.state, watermark, cached.memo, cached.queues)
            same_rows(got, expected)
            fired += len(got)
            if engine.next_timer(cached.state) is None:
                states.clear(key)
                plain.pop(key, None)
                continue
            prune_memo(cached.memo, cached.state)
            states.fired(key, cached)
        plain[key] = pickle.dumps(old)
        if step % 37 == 0:  # a restore: a new function, state read back from Flink's
            reads += states.reads if isinstance(states, KeyStates) else 1
            states = layout_states()
            restores += 1
    assert fired > 100
    assert restores > 5
    if isinstance(states, KeyStates):
        assert reads + states.reads > restores  # keys were read back, not only created


def test_window_queue_counts_distinct_values_out_as_tiles_leave(monkeypatch):
    monkeypatch.setattr(windows, "QUEUE_FROM_TILES", 1)
    compiled = compile_view(view((Window.sliding("3m", "1m"),)))
    engine = WindowEngine(compiled)
    distinct = next(s for s in compiled.specs if s.function is F.COUNT_DISTINCT)
    state = new_state()
    memo: windows.Memo = {}
    queues: windows.Queues = {}
    for minute, zones in enumerate([{"z1"}, {"z1", "z2"}, {"z3"}, set(), {"z4"}]):
        if zones:
            tile: list[Any] = [None] * len(compiled.slots)
            tile[distinct.slot] = zones
            engine.add_tile(state, minute * MINUTE, tile)
    rows = engine.fire(state, 10 * MINUTE, memo, queues)
    counts = [values[distinct.name] for _, values in rows]
    # Ends 1..7 minutes: windows [-2,1) .. [4,7), then the closing row of the empty [5,8).
    assert counts == [1, 2, 3, 3, 2, 1, 1, 0]
    assert 3 * MINUTE in queues


def test_thirty_days_on_minute_slides_compile_for_tiles_but_not_per_event():
    month = compile_view(view((Window.sliding("30d", "1m"),)))
    assert uses_map_state(month)
    assert not uses_map_state(compile_view(restaurant_orders))
    assert month.max_window_ms // month.slide_ms == 43_200 > EVENT_ENGINE_MAX_TILES
    with pytest.raises(UnsupportedViewError, match=r"43200 slides.*SLUICE_STREAM_ENGINE=tiles"):
        check_event_engine(month)
    check_event_engine(compile_view(view((Window.sliding("1h", "1m"),))))
    with pytest.raises(UnsupportedViewError, match="2592000 slides per window"):
        compile_view(view((Window.sliding("30d", "1s"),)))


def test_sorted_tiles_keep_their_buckets_in_order() -> None:
    """windows.SortedTiles: random adds (late ones among them) and deletes keep buckets()
    equal to the sorted keys; the mutators that would bypass the order are refused."""
    rng = random.Random(7)
    tiles = windows.SortedTiles([(600, [1]), (60, [2])])
    plain: dict[int, Any] = {600: [1], 60: [2]}
    for _ in range(3000):
        bucket = rng.randrange(0, 500) * 60
        if bucket in plain and rng.random() < 0.5:
            del tiles[bucket]
            del plain[bucket]
        else:
            tiles[bucket] = plain[bucket] = [bucket]
        assert tiles.buckets() == sorted(plain)
    assert tiles == plain
    assert tiles.first() == min(plain)
    again = pickle.loads(pickle.dumps(tiles))
    assert isinstance(again, windows.SortedTiles)
    assert again.buckets() == sorted(plain)
    refused: list[Callable[[], Any]] = [
        lambda: tiles.pop(60),
        lambda: tiles.update({1: []}),
        lambda: tiles.clear(),
    ]
    for call in refused:
        with pytest.raises(TypeError, match="item assignment and del only"):
            call()
    assert tiles.buckets() == sorted(plain)
