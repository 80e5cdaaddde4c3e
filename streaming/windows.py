"""Per-key window state of the stream engine: tiles, window ends, rows. Pure Python.

The Flink KeyedProcessFunction (streaming/functions.py) is a thin adapter around this, so the
semantics can be checked against features/reference.py without a JVM.

State of one key: [next_end, tiles]. ``tiles`` maps a slide bucket's start to its partial
aggregates; ``next_end`` is the first window end not yet final (None before the first timer).
A window end E is final once the watermark has reached E: the job refuses events whose bucket
ends at or before the watermark (they are late), so no event can still land in [.., E).

Firing at a timer ts walks every end in [next_end, ts] that has something to say, in order:
  - a row when the largest window [E - max, E) holds a tile (smaller windows may be empty);
  - the closing row of empty values when it does not but the previous end had a row.
Walking all due ends at once makes the rows independent of the order and number of timer
firings: Flink may fire a timer twice (one registered by an event, the same one by a previous
firing) or fire a far timer before a near one when the watermark jumps; a firing that finds
nothing new does nothing.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import Any

from features.definitions import AggregationFunction as F
from streaming.compile import ColumnNeeds, CompiledView, Spec
from streaming.errors import WindowStateError

# Column partials in a tile, by index (lists: cheaper to pickle than objects).
_NN, _SUM, _MIN, _MAX, _LAST_T, _LAST_V, _DISTINCT, _VALUES = range(8)
Tile = list[Any]  # [event count, column partials...]
State = list[Any]  # [next_end: int | None, tiles: dict[int, Tile]]
Row = tuple[int, dict[str, Any]]  # (window end ms, feature values)


def new_state() -> State:
    return [None, {}]


class WindowEngine:
    """Adds events to a key's state and turns timer firings into rows, for one view."""

    def __init__(self, compiled: CompiledView) -> None:
        self.c = compiled
        self.slide = compiled.slide_ms
        self.largest = compiled.max_window_ms
        self._needs = compiled.needs
        self._empty = compiled.empty_row()
        # Per window size: its features, and the columns they read (only those are merged).
        self._by_window = tuple(
            (
                size,
                specs := tuple(s for s in compiled.specs if s.window_ms == size),
                tuple(sorted({s.column for s in specs if s.column is not None})),
            )
            for size in compiled.window_sizes_ms
        )

    def bucket(self, t: int) -> int:
        return t - t % self.slide

    def _new_tile(self) -> Tile:
        tile: Tile = [0]
        for need in self._needs:
            tile.append(_new_column(need))
        return tile

    def add(self, state: State, t: int, values: tuple[Any, ...]) -> bool:
        """Add one event; True when it opened a new bucket (the caller then sets a timer)."""
        next_end, tiles = state
        bucket = self.bucket(t)
        if next_end is not None and bucket + self.slide < next_end:
            raise WindowStateError(
                f"view {self.c.name!r}: event at {t} reached the window state after its window "
                f"end {bucket + self.slide} was emitted; the late check must stop it earlier"
            )
        tile = tiles.get(bucket)
        created = tile is None
        if tile is None:
            tile = tiles[bucket] = self._new_tile()
        tile[0] += 1
        for i, value in enumerate(values):
            if value is not None:
                _add_value(tile[i + 1], self._needs[i], t, value)
        return created

    def fire(self, state: State, upto: int) -> list[Row]:
        """Rows of every end <= upto not emitted yet, oldest first; evicts spent tiles.

        ``upto`` is a timer's time or the watermark: every end at or before it is final.
        """
        next_end, tiles = state
        slide, largest = self.slide, self.largest
        ts = upto - upto % slide  # the last window end at or before upto
        rows: list[Row] = []
        memo: dict[tuple[int, int, int], dict[str, Any]] = {}
        buckets = sorted(tiles)
        if buckets:
            end = buckets[0] + slide if next_end is None else max(next_end, buckets[0] + slide)
            while buckets and end <= ts:
                first_in_window = bisect_left(buckets, end - largest)
                if first_in_window < len(buckets) and buckets[first_in_window] < end:
                    rows.append((end, self.values_at(tiles, buckets, end, memo)))
                elif buckets[0] == end - largest - slide:
                    rows.append((end, dict(self._empty)))
                # Bucket end - largest stays: the closing check at end + slide looks at it.
                for bucket in buckets[:first_in_window]:
                    del tiles[bucket]
                buckets = buckets[first_in_window:]
                if buckets:
                    end = max(end + slide, buckets[0] + slide)
        state[0] = ts + slide if next_end is None else max(next_end, ts + slide)
        return rows

    def next_timer(self, state: State) -> int | None:
        """The next end at which this key has a row or a closing row due; None when idle."""
        next_end, tiles = state
        if not tiles:
            return None
        first: int = min(tiles) + self.slide
        return first if next_end is None else max(int(next_end), first)

    def values_at(
        self,
        tiles: dict[int, Tile],
        buckets: list[int],
        end: int,
        memo: dict[tuple[int, int, int], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Every feature of the row at ``end``, each over its own window's tiles.

        ``memo`` (one per fire) reuses a window's values while the same tiles are in it: a
        quiet key's hour window holds one tile for 60 consecutive ends, and catching up
        emits all of them at once.
        """
        out: dict[str, Any] = {}
        for size, specs, columns in self._by_window:
            lo = bisect_left(buckets, end - size)
            hi = bisect_left(buckets, end)
            key = (size, buckets[lo], buckets[hi - 1]) if lo < hi else (size, 0, -1)
            values = memo.get(key) if memo is not None else None
            if values is None:
                values = self._window_values([tiles[b] for b in buckets[lo:hi]], specs, columns)
                if memo is not None:
                    memo[key] = values
            out.update(values)
        return out

    def _window_values(
        self, window: list[Tile], specs: tuple[Spec, ...], columns: tuple[int, ...]
    ) -> dict[str, Any]:
        events = sum(tile[0] for tile in window)
        merged: dict[int, list[Any]] = {}
        for i in columns:
            parts = [tile[i + 1] for tile in window if tile[i + 1][_NN]]
            merged[i] = _merge_column(parts, self._needs[i])
        return {
            spec.name: events if spec.column is None else _value(spec.function, merged[spec.column])
            for spec in specs
        }


def _new_column(need: ColumnNeeds) -> list[Any]:
    return [
        0,
        0.0,
        None,
        None,
        None,
        None,
        set() if need.distinct else None,
        [] if need.values else None,
    ]


def _add_value(part: list[Any], need: ColumnNeeds, t: int, value: Any) -> None:
    part[_NN] += 1
    if need.numeric:
        part[_SUM] += value
        if part[_MIN] is None or value < part[_MIN]:
            part[_MIN] = value
        if part[_MAX] is None or value > part[_MAX]:
            part[_MAX] = value
    # last: greatest event time, ties to the greatest value (definitions.py).
    if part[_LAST_T] is None or (t, value) > (part[_LAST_T], part[_LAST_V]):
        part[_LAST_T], part[_LAST_V] = t, value
    if need.distinct:
        part[_DISTINCT].add(value)
    if need.values:
        part[_VALUES].append(value)


def _merge_column(parts: list[list[Any]], need: ColumnNeeds) -> list[Any]:
    """Partials of several tiles as one (only tiles that saw a non-null value are passed)."""
    merged = _new_column(need)
    if not parts:
        return merged
    merged[_NN] = sum(p[_NN] for p in parts)
    if need.numeric:
        # fsum of per-tile sums: within a few ulps of the reference's fsum over all values.
        merged[_SUM] = math.fsum(p[_SUM] for p in parts)
        merged[_MIN] = min(p[_MIN] for p in parts)
        merged[_MAX] = max(p[_MAX] for p in parts)
    last = max(parts, key=lambda p: (p[_LAST_T], p[_LAST_V]))
    merged[_LAST_T], merged[_LAST_V] = last[_LAST_T], last[_LAST_V]
    if need.distinct:
        merged[_DISTINCT] = set().union(*(p[_DISTINCT] for p in parts))
    if need.values:
        merged[_VALUES] = [v for p in parts for v in p[_VALUES]]
    return merged


def _value(function: F, part: list[Any]) -> Any:
    """One aggregate from merged partials; empty values as definitions.empty_value says."""
    n = part[_NN]
    if function is F.COUNT_DISTINCT:
        return len(part[_DISTINCT])
    if function is F.SUM:
        return float(part[_SUM]) if n else 0.0
    if n == 0:
        return None
    match function:
        case F.MEAN:
            return float(part[_SUM]) / n
        case F.MIN:
            return float(part[_MIN])
        case F.MAX:
            return float(part[_MAX])
        case F.LAST:
            return part[_LAST_V]
        case F.STDDEV:
            if n < 2:
                return None
            numbers = [float(v) for v in part[_VALUES]]
            mean = math.fsum(numbers) / n
            return math.sqrt(math.fsum((x - mean) ** 2 for x in numbers) / (n - 1))
    raise WindowStateError(f"aggregation {function} has no stream implementation")
