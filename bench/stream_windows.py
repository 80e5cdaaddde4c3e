"""Benchmark: the tile engine's Python cost per key and minute with a 30-day window on 1-minute
slides (43,200 tiles per key), the old layout against the new, in pure Python (no JVM).

For each example stream view with its windows replaced by 30 days every minute, one key whose
tiles fill the whole window, then one minute of steady state: one tile row (a new tile) and
one firing (one end: a tile enters, one leaves):
  old   the key's state as one pickled value (read and written on the tile row and on the
        firing) and every window merged from all its tiles at the end;
  new   one Flink state entry per tile (the tile row writes one tile, the firing removes one
        and writes the shard's next end; streaming/tile_state.py) and the window's WindowQueue
        (streaming/windows.py).
Prints milliseconds per key and minute for both and their ratio, and the same for the views'
own 1-hour windows (whose windows stay below QUEUE_FROM_TILES: the layout alone).
Run: `python -m bench.stream_windows` (about 30 s).
"""

from __future__ import annotations

import pickle
import random
import statistics
import time
from typing import Any

from bench.stream_jobs import month_view
from examples.delivery.features import restaurant_orders, zone_couriers
from features.aggregations import AGGREGATIONS
from streaming.compile import CompiledView, compile_view
from streaming.tile_state import ShardStates, fire_shard
from streaming.windows import WindowEngine, new_state

MINUTE = 60_000
START = 1_767_268_800_000


class _Map:
    """A MapState stand-in that pickles on put, as Flink's state backend serializes."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> Any:
        return pickle.loads(self.data[key]) if key in self.data else None

    def put(self, key: str, value: Any) -> None:
        self.data[key] = pickle.dumps(value)

    def remove(self, key: str) -> None:
        del self.data[key]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, pickle.loads(v)) for k, v in self.data.items()]


def tile(compiled: CompiledView, rng: random.Random, bucket: int) -> list[Any]:
    values = {"speed_kmh": rng.uniform(5, 40), "courier_id": f"c{rng.randrange(150)}"}
    values |= {"items": rng.randint(1, 5), "subtotal": rng.uniform(5, 80)}
    states = []
    for index, function in compiled.slots:
        column = None if index is None else compiled.columns[index]
        events = [(bucket + i, None if column is None else values[column]) for i in range(3)]
        states.append(AGGREGATIONS[function].of(events))
    return states


def per_minute_ms(compiled: CompiledView, minutes: int) -> tuple[float, float, float]:
    """Milliseconds of one key's minute of steady state (module docstring): the median of
    the old and of the new path, and the new path's greatest (its queue's rebuild)."""
    rng = random.Random(7)
    engine = WindowEngine(compiled)
    tiles_per_window = compiled.max_window_ms // compiled.slide_ms
    old = new_state()
    states = ShardStates(_Map())
    shard = states.shard(0)
    cached = states.entity(shard, "k")
    for i in range(tiles_per_window):
        bucket = START + i * MINUTE
        row = tile(compiled, rng, bucket)
        engine.add_tile(old, bucket, row)
        engine.add_tile(cached.state, bucket, list(row))
        states.tile_changed(shard, "k", cached, bucket, True)
    upto = START + tiles_per_window * MINUTE
    # Every end before ``upto`` emitted already (firing them all here would merge the whole
    # window 43,200 times on the old path); the end at ``upto`` fills the new path's queue.
    old[0] = cached.state[0] = upto
    engine.fire(old, upto)
    fire_shard(engine, states, shard, upto, lambda *_: None)
    stored = pickle.dumps(old)
    timings: dict[str, list[float]] = {"old": [], "new": []}
    for layout, count in (("old", minutes), ("new", 20 * minutes)):
        for m in range(count):
            bucket = upto + m * MINUTE
            row = tile(compiled, rng, bucket)
            started = time.perf_counter()
            if layout == "old":
                state = pickle.loads(stored)
                engine.add_tile(state, bucket, row)
                stored = pickle.dumps(state)
                state = pickle.loads(stored)
                engine.fire(state, bucket + MINUTE)
                stored = pickle.dumps(state)
            else:
                shard = states.shard(0)
                cached = states.entity(shard, "k")
                engine.add_tile(cached.state, bucket, row)
                states.tile_changed(shard, "k", cached, bucket, True)
                fire_shard(engine, states, shard, bucket + MINUTE, lambda *_: None)
            timings[layout].append((time.perf_counter() - started) * 1e3)
    return statistics.median(timings["old"]), statistics.median(timings["new"]), max(timings["new"])


def main() -> None:
    print(f"{'view':34} {'tiles':>7} {'old ms':>9} {'new ms':>9} {'old/new':>8} {'new max':>9}")
    for view in (restaurant_orders, zone_couriers):
        for label, v, minutes in (
            (view.name, view, 400),
            (f"{view.name} (30d)", month_view(view), 5),
        ):
            compiled = compile_view(v)
            old, new, worst = per_minute_ms(compiled, minutes)
            tiles = compiled.max_window_ms // compiled.slide_ms
            print(f"{label:34} {tiles:7,} {old:9.3f} {new:9.3f} {old / new:8.1f} {worst:9.3f}")
    print(
        "per key and minute (median): one tile row and one firing (one end), Python only; "
        "new max: the slowest minute of the new path, the one where the window's queue turns "
        "its newer stack into the older one (once per window length per key)"
    )


if __name__ == "__main__":
    main()
