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
from streaming.tile_state import NEXT_ENTRY, ROWS_ENTRY, Shard, ShardStates, fire_shard
from streaming.windows import WindowEngine, new_state

F = AggregationFunction
MINUTE = 60_000


class FakeMap:
    """PyFlink's MapState of the current key, stored pickled (as Flink does)."""

    def __init__(self) -> None:
        self.by_key: dict[int, dict[str, bytes]] = {}
        self.key = 0

    def get(self, entry: str) -> Any:
        stored = self.by_key.get(self.key, {}).get(entry)
        return None if stored is None else pickle.loads(stored)

    def put(self, entry: str, tile: Any) -> None:
        if entry == NEXT_ENTRY:
            assert -(2**63) <= tile < 2**63, "a long"
        self.by_key.setdefault(self.key, {})[entry] = pickle.dumps(tile)

    def remove(self, entry: str) -> None:
        del self.by_key[self.key][entry]

    def entries(self, entry: str) -> dict[int, Any]:
        """Per key, its value of ``entry`` (when it has one)."""
        return {k: pickle.loads(e[entry]) for k, e in self.by_key.items() if entry in e}

    def items(self) -> list[tuple[str, Any]]:
        return [(e, pickle.loads(v)) for e, v in self.by_key.get(self.key, {}).items()]


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


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_shards_and_window_queues_give_the_rows_of_the_plain_path(seed, monkeypatch):
    """Entities in shards (one timer, one next end each) against one state per entity fired at
    every step, with restores (the state read back from the fake Flink states) and a cache
    small enough that shards push each other out."""
    # Queues from 3 tiles, so that 10- and 25-minute windows use them (30 days would be slow
    # on the plain path); the 1-minute window stays on the plain path beside them.
    monkeypatch.setattr(windows, "QUEUE_FROM_TILES", 3)
    compiled = compile_view(
        view((Window.sliding("1m", "1m"), Window.sliding("10m", "1m"), Window.sliding("25m", "1m")))
    )
    rng = random.Random(seed)
    engine = WindowEngine(compiled)
    tiles = FakeMap()
    capacity = rng.choice([30, 10_000])
    states = ShardStates(tiles, capacity=capacity)
    shard_of = {entity: rng.randrange(3) for entity in "abcdefg"}
    plain: dict[str, windows.State] = {}  # one state per entity, as keyed by entity
    watermark = 0
    restores = fired = reads = 0
    rows = {"written": 0, "at_restore": 0}  # rows emitted; as of the last restore

    def current(key: int) -> Shard:
        tiles.key = key
        return states.shard(key)

    for step in range(500):
        if rng.random() < 0.7:
            # A tile row for an open bucket (its end after the watermark), in any order, of
            # any entity; several rows of one bucket merge.
            entity = rng.choice(list(shard_of))
            shard = current(shard_of[entity])
            cached = states.entity(shard, entity)
            old = plain.setdefault(entity, new_state())
            # Gaps of up to an hour: tiles leave the 25-minute window with nothing after them.
            bucket = watermark - watermark % MINUTE
            bucket += MINUTE * rng.choice([0, 1, 2, 3, rng.randrange(60)])
            row = random_tile(compiled, rng, bucket)
            copied = [s.copy() if isinstance(s, set) else s for s in row]
            new = engine.add_tile(cached.state, bucket, copied) is windows.Added.NEW_TILE
            states.tile_changed(shard, entity, cached, bucket, new)
            engine.add_tile(old, bucket, row)
        else:
            watermark += rng.choice([0, MINUTE // 2, MINUTE, 5 * MINUTE, 40 * MINUTE])
            got: dict[str, list[Any]] = {}

            def emit(entity: str, end: int, values: dict[str, Any], got: Any = got) -> None:
                got.setdefault(entity, []).append((end, values))
                rows["written"] += 1

            for key in sorted(set(shard_of.values())):
                shard = current(key)
                timer = fire_shard(engine, states, shard, watermark, emit)
                with_tiles = [c for c in shard.entities.values() if c.state[1]]
                assert (timer is None) == (not with_tiles)
                if timer is not None:  # the earliest end due among the shard's entities
                    assert timer == min(engine.next_timer(c.state) or 0 for c in with_tiles)
                    assert timer > watermark
            for entity in list(plain):
                expected = engine.fire(plain[entity], watermark)
                same_rows(got.pop(entity, []), expected)
                fired += len(expected)
                if engine.next_timer(plain[entity]) is None:
                    del plain[entity]
            assert got == {}
            held = {e for key in set(shard_of.values()) for e in current(key).entities}
            assert held == set(plain)  # entities without tiles left their shard
        if step % 37 == 0:  # a restore: a new function, state read back from Flink's
            reads += states.reads
            states = ShardStates(tiles, capacity=capacity)
            restores += 1
            # Every shard read back (the shards' timers do that live): the rows written
            # before the restore, each counted once.
            for key in range(3):
                current(key)
            assert states.restored_rows == rows["written"]
            rows["at_restore"] = rows["written"]
    # The end of the input: Flink's last watermark is the largest long, every row is due.
    end_of_input = 2**63 - 1
    closing: dict[str, list[Any]] = {}

    def close(entity: str, end: int, values: dict[str, Any]) -> None:
        closing.setdefault(entity, []).append((end, values))
        rows["written"] += 1

    for key in sorted(set(shard_of.values())):
        shard = current(key)
        fire_shard(engine, states, shard, end_of_input, close)
        assert shard.entities == {}
    for entity, state in plain.items():
        same_rows(closing.pop(entity, []), engine.fire(state, end_of_input))
    assert closing == {}
    assert tiles.entries(NEXT_ENTRY) == {}  # shards without entities keep no next end
    # Only the rows written are left, per shard: as many as were emitted, and read back once
    # (shards the small cache dropped and read again add nothing to what was restored).
    assert all(set(entries) <= {ROWS_ENTRY} for entries in tiles.by_key.values())
    assert sum(tiles.entries(ROWS_ENTRY).values()) == rows["written"]
    assert states.restored_rows == rows["at_restore"] < rows["written"]
    assert fired > 100
    assert restores > 5
    assert reads + states.reads > restores  # shards were read back, not only created
    assert len(tiles.by_key) > 1


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


def test_rows_written_are_restored_once_per_shard_though_read_back_again() -> None:
    """A shard dropped by the cache and read back holds this run's rows too: not restored."""
    compiled = compile_view(view((Window.sliding("10m", "1m"),)))
    engine = WindowEngine(compiled)
    tiles = FakeMap()
    rng = random.Random(7)

    def current(states: ShardStates, key: int) -> Shard:
        tiles.key = key
        return states.shard(key)

    def run(states: ShardStates, watermark: int) -> int:
        """A tile for each shard's entity at the watermark, then a firing a minute on."""
        written = []
        for key in (0, 1):
            shard = current(states, key)
            cached = states.entity(shard, f"e{key}")
            new = engine.add_tile(cached.state, watermark, random_tile(compiled, rng, watermark))
            states.tile_changed(shard, f"e{key}", cached, watermark, new is windows.Added.NEW_TILE)
        for key in (0, 1):
            shard = current(states, key)
            fire_shard(engine, states, shard, watermark + MINUTE, lambda *row: written.append(row))
        return len(written)

    first = ShardStates(tiles, capacity=1)  # one shard pushes the other out
    before = run(first, 0)
    assert before == 2
    assert first.restored_rows == 0  # a fresh start
    restored = ShardStates(tiles, capacity=1)
    after = run(restored, MINUTE)  # reads 0, 1 (0 out), 0 again (1 out), 1 again
    assert restored.reads >= 4
    assert restored.restored_rows == before
    assert after == 2
    assert tiles.entries(ROWS_ENTRY) == {0: 2, 1: 2}
