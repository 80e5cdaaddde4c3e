"""Per-key window state of the stream engine: tiles, window ends, rows. Pure Python.

The Flink KeyedProcessFunction (streaming/functions.py) is a thin adapter around this, so the
semantics can be checked against features/reference.py without a JVM.

State of one key: [next_end, tiles]. ``tiles`` maps a slide bucket's start to its tile: one
partial state per slot of the compiled view (CompiledView.slots), built, merged and turned into
values by the aggregation objects of features/aggregations.py, then the ids of the events the
tile holds; ``next_end`` is the first window end not yet final (None before the first timer).
A window end E is final once the watermark has reached E: the job refuses events whose bucket
ends at or before the watermark (they are late), so no event can still land in [.., E).

Duplicates: ingest is at least once, so an event may be read twice (the same canonical bytes,
so the same id, events/identity.py; both copies in the same partition, since the key picks
it). A copy of an event has the event's time, so it lands in the event's tile: each open tile
keeps the compact ids (the first 8 bytes of the md5, an int) of the events it counted, and a
repeat is dropped and counted as a duplicate. Once the watermark passes a tile's end the tile
is closed (any further event for it is late and never reaches the state), so its ids are
dropped right then: the ids held are those of the open tiles only, at most a slide or two of
events per key.

Firing at a timer ts walks every end in [next_end, ts] that has something to say, in order:
  - a row when the largest window [E - max, E) holds a tile (smaller windows may be empty);
  - the closing row of empty values when it does not but the previous end had a row.
Walking all due ends at once makes the rows independent of the order and number of timer
firings: Flink may fire a timer twice (one registered by an event, the same one by a previous
firing) or fire a far timer before a near one when the watermark jumps; a firing that finds
nothing new does nothing.

Long windows (more than QUEUE_FROM_TILES slides, e.g. 30 days on 1-minute slides: 43,200
tiles) are not merged tile by tile at every end: a caller may keep a WindowQueue per window
size (the tile engine keeps one per key, a cache beside the state), so that an end costs the
tiles that entered and left the window since the previous one. Every tile before an end being
fired is final (the late check stops anything that would change it), so a window's tiles are a
FIFO queue in bucket order: tiles enter at the new end, leave at the old one. The queue is the
classic two-stacks sliding aggregate (merge only, no subtraction, so exact for min, max, last
and float states alike): the newer stack keeps one running merge, the older stack the merges
of each of its tiles with every newer tile in it, rebuilt from the newer stack when it runs
out; a window's value is the merge of the two tops. count_distinct keeps a count per value
instead (a set per stack entry would hold the window's values once per tile). Float states
(sum, mean, stddev) are merged in another grouping than bucket order: within rounding, as
features/aggregations.py allows any grouping.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections import Counter
from enum import IntEnum
from typing import Any

from features.aggregations import AGGREGATIONS, AggregationFunction, Aggregator
from streaming.compile import CompiledView, Spec
from streaming.errors import WindowStateError

# A tile: per slot, its partial state or None (no value yet), then the set of the ids of its
# events while it is open (None once closed). A list: cheap to pickle.
Tile = list[Any]
State = list[Any]  # [next_end: int | None, tiles: dict[int, Tile]]
Row = tuple[int, dict[str, Any]]  # (window end ms, feature values)
Memo = dict[tuple[int, int, int], dict[str, Any]]
IDS = -1  # a tile's last element
# Windows of more tiles than this are assembled by a WindowQueue when the caller keeps one.
QUEUE_FROM_TILES = 240


class Added(IntEnum):
    """What ``WindowEngine.add`` did with an event."""

    DUPLICATE = 0  # its id was in the tile already: not counted again
    COUNTED = 1  # added to an existing tile
    NEW_TILE = 2  # added to a new tile: the caller sets a timer at its end


def new_state() -> State:
    return [None, {}]


class SortedTiles(dict[int, Tile]):
    """A key's tiles that keep their buckets in order as tiles come and go.

    A firing walks the buckets in order. Sorting them on every firing cost 0.56 ms of the
    0.7 ms a firing took at 43,200 tiles (30 days of 1-minute slides); kept in order here, a
    new bucket (almost always the newest) is appended and an evicted one (the oldest) removed
    from the front. The tile engine's MapState layout uses it (streaming/tile_state.py); a
    plain dict works everywhere, sorted per firing. Only item assignment and ``del`` change
    it: the other mutators are refused, so the order can never go stale.
    """

    def __init__(self, items: Any = ()) -> None:
        super().__init__(items)
        self._order = sorted(self)

    def __setitem__(self, bucket: int, tile: Tile) -> None:
        if bucket not in self:
            order = self._order
            if not order or bucket > order[-1]:
                order.append(bucket)
            else:  # a late tile
                insort(order, bucket)
        super().__setitem__(bucket, tile)

    def __delitem__(self, bucket: int) -> None:
        super().__delitem__(bucket)
        del self._order[bisect_left(self._order, bucket)]

    def buckets(self) -> list[int]:
        """The buckets, oldest first (a copy: the caller may keep it while tiles go)."""
        return self._order.copy()

    def first(self) -> int:
        return self._order[0]

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (list(self.items()),))

    def _refused(self, *_args: Any, **_kwargs: Any) -> Any:
        raise TypeError("SortedTiles changes by item assignment and del only")

    pop = popitem = setdefault = update = clear = __ior__ = _refused


def open_ids(state: State) -> int:
    """How many event ids a key's state holds (those of its open tiles)."""
    return sum(len(tile[IDS]) for tile in state[1].values() if tile[IDS] is not None)


class WindowEngine:
    """Adds events to a key's state and turns timer firings into rows, for one view."""

    def __init__(self, compiled: CompiledView) -> None:
        self.c = compiled
        self.slide = compiled.slide_ms
        self.largest = compiled.max_window_ms
        # Per slot: the index of the event value it reads (None for count, which counts
        # events), its place in a tile, and its aggregation object.
        self._slots = tuple(
            (index, slot, AGGREGATIONS[function])
            for slot, (index, function) in enumerate(compiled.slots)
        )
        self._empty = compiled.empty_row()
        # Per window size: its features with their slots' aggregation objects.
        self._by_window = tuple(
            (
                size,
                tuple(
                    (spec, AGGREGATIONS[spec.function])
                    for spec in compiled.specs
                    if spec.window_ms == size
                ),
            )
            for size in compiled.window_sizes_ms
        )
        self._sizes = tuple(compiled.window_sizes_ms)

    def bucket(self, t: int) -> int:
        return t - t % self.slide

    def add(self, state: State, t: int, values: tuple[Any, ...], event_id: int) -> Added:
        """Add one event, unless its tile already counted ``event_id`` (a duplicate)."""
        next_end, tiles = state
        bucket = self.bucket(t)
        if next_end is not None and bucket + self.slide < next_end:
            raise WindowStateError(
                f"view {self.c.name!r}: event at {t} reached the window state after its window "
                f"end {bucket + self.slide} was emitted; the late check must stop it earlier"
            )
        tile = tiles.get(bucket)
        if tile is None:
            tile = tiles[bucket] = [None] * len(self._slots) + [{event_id}]
            outcome = Added.NEW_TILE
        else:
            ids = tile[IDS]
            if event_id in ids:
                return Added.DUPLICATE
            ids.add(event_id)
            outcome = Added.COUNTED
        for index, slot, aggregator in self._slots:
            value = None if index is None else values[index]
            tile[slot] = aggregator.fold(tile[slot], t, value)
        return outcome

    def add_tile(self, state: State, bucket: int, states: list[Any]) -> Added:
        """Merge a tile's partial states (one per slot, the tile engine's rows) into the key's
        tile of ``bucket``. The tile engine deduplicates in SQL, so tiles keep no ids."""
        next_end, tiles = state
        if next_end is not None and bucket + self.slide < next_end:
            raise WindowStateError(
                f"view {self.c.name!r}: a tile of bucket {bucket} reached the window state "
                f"after its window end {bucket + self.slide} was emitted"
            )
        tile = tiles.get(bucket)
        if tile is None:
            tiles[bucket] = [*states, None]
            return Added.NEW_TILE
        for _, slot, aggregator in self._slots:
            mine, theirs = tile[slot], states[slot]
            if theirs is not None:
                tile[slot] = theirs if mine is None else aggregator.merge(mine, theirs)
        return Added.COUNTED

    def fire(
        self,
        state: State,
        upto: int,
        memo: Memo | None = None,
        queues: Queues | None = None,
    ) -> list[Row]:
        """Rows of every end <= upto not emitted yet, oldest first; evicts spent tiles.

        ``upto`` is a timer's time or the watermark: every end at or before it is final.
        ``memo``: window values by (size, first bucket, last bucket), kept by the caller
        across firings of one key (see values_at); one per firing when not given.
        ``queues``: the key's WindowQueues by window size, kept by the caller (module
        docstring); None: every window is merged from its tiles.
        """
        next_end, tiles = state
        slide, largest = self.slide, self.largest
        ts = upto - upto % slide  # the last window end at or before upto
        rows: list[Row] = []
        memo = {} if memo is None else memo
        buckets = tiles.buckets() if isinstance(tiles, SortedTiles) else sorted(tiles)
        sizes = self._sizes
        # The values of the row at end - slide (None: no such row, or a closing one).
        previous: dict[str, Any] | None = None
        if buckets:
            end = buckets[0] + slide if next_end is None else max(next_end, buckets[0] + slide)
            while buckets and end <= ts:
                first_in_window = bisect_left(buckets, end - largest)
                if first_in_window < len(buckets) and buckets[first_in_window] < end:
                    if (
                        previous is not None
                        and rows[-1][0] == end - slide
                        and end - slide not in tiles
                        and not any(end - size - slide in tiles for size in sizes)
                    ):
                        # No tile entered a window (bucket end - slide) or left one (bucket
                        # end - size - slide) since the row at end - slide: its values, the
                        # same object (rows are read, never changed). A quiet key's row.
                        rows.append((end, previous))
                    else:
                        previous = self.values_at(tiles, buckets, end, memo, queues)
                        rows.append((end, previous))
                elif buckets[0] == end - largest - slide:
                    previous = None
                    rows.append((end, dict(self._empty)))
                # Bucket end - largest stays: the closing check at end + slide looks at it.
                for bucket in buckets[:first_in_window]:
                    del tiles[bucket]
                buckets = buckets[first_in_window:]
                if buckets:
                    end = max(end + slide, buckets[0] + slide)
        # Tiles whose end the watermark reached are closed: no event can reach them any more.
        # Those before next_end - slide were closed by an earlier firing (add refuses them).
        open_from = 0 if next_end is None else bisect_left(buckets, next_end - slide)
        for bucket in buckets[open_from:]:
            if bucket + slide > ts:
                break
            tiles[bucket][IDS] = None
        state[0] = ts + slide if next_end is None else max(next_end, ts + slide)
        return rows

    def next_timer(self, state: State) -> int | None:
        """The next end at which this key has a row or a closing row due; None when idle."""
        next_end, tiles = state
        if not tiles:
            return None
        first: int = (tiles.first() if isinstance(tiles, SortedTiles) else min(tiles)) + self.slide
        return first if next_end is None else max(int(next_end), first)

    def values_at(
        self,
        tiles: dict[int, Tile],
        buckets: list[int],
        end: int,
        memo: Memo | None = None,
        queues: Queues | None = None,
    ) -> dict[str, Any]:
        """Every feature of the row at ``end``, each over its own window's tiles.

        ``memo`` reuses a window's values while the same tiles are in it: a quiet key's hour
        window holds one tile for 60 consecutive ends, and catching up emits all of them at
        once. The first and last bucket name the tiles exactly, since every tile before an
        end being fired is final (no event or tile row can reach it any more), so a memo may
        also live across firings (the tile engine keeps one per key: prune_memo).
        """
        out: dict[str, Any] = {}
        for size, specs in self._by_window:
            lo = bisect_left(buckets, end - size)
            hi = bisect_left(buckets, end)
            if queues is not None and size > QUEUE_FROM_TILES * self.slide:
                # Not memoized: a long window's first bucket stays for days, so the memo
                # would keep an entry per end; the queue reuses its last values itself.
                queue = queues.get(size)
                if queue is None:
                    queue = queues[size] = WindowQueue(specs)
                out.update(queue.values(tiles, buckets, end - size, end))
                continue
            key = (size, buckets[lo], buckets[hi - 1]) if lo < hi else (size, 0, -1)
            values = memo.get(key) if memo is not None else None
            if values is None:
                values = _window_values([tiles[b] for b in buckets[lo:hi]], specs)
                if memo is not None:
                    memo[key] = values
            out.update(values)
        return out


def prune_memo(memo: Memo, state: State) -> None:
    """Drop the memo's windows that hold a tile the state has evicted."""
    tiles = state[1]
    if not tiles:
        memo.clear()
        return
    oldest = tiles.first() if isinstance(tiles, SortedTiles) else min(tiles)
    for key in [k for k in memo if k[2] >= 0 and k[1] < oldest]:
        del memo[key]


def _window_values(
    window: list[Tile], specs: tuple[tuple[Spec, Aggregator[Any]], ...]
) -> dict[str, Any]:
    """Each feature over a window's tiles: their states merged, then the result (an empty
    window, or one whose values were all null, gives the function's empty value)."""
    out: dict[str, Any] = {}
    for spec, aggregator in specs:
        slot = spec.slot
        merged = aggregator.merge_all([t[slot] for t in window if t[slot] is not None])
        out[spec.name] = aggregator.result(merged)
    return out


# An entry of the older stack: (bucket, per merged spec: the tile's state merged with every newer
# tile's of that stack, None for no values; the tile).
Entry = tuple[int, list[Any], Tile]


class WindowQueue:
    """One window size's tiles of one key as a two-stacks sliding aggregate (module docstring).

    A cache: it can be dropped at any time and is rebuilt from the tiles at the next end.
    """

    def __init__(self, specs: tuple[tuple[Spec, Aggregator[Any]], ...]) -> None:
        distinct = AggregationFunction.COUNT_DISTINCT
        self._merged = tuple((s.name, s.slot, a) for s, a in specs if a.function is not distinct)
        self._distinct = tuple((s.name, s.slot) for s, a in specs if a.function is distinct)
        self._reset()

    def _reset(self) -> None:
        self.older: list[Entry] = []  # the oldest tile last
        self.newer: list[tuple[int, Tile]] = []  # the oldest tile first
        self.newer_merged: list[Any] = [None] * len(self._merged)
        self.counts: list[Counter[Any]] = [Counter() for _ in self._distinct]
        self.last: int | None = None  # the newest bucket that entered
        # The values of the last window and what identified its tiles (oldest, newest, number).
        self._content: tuple[int | None, int | None, int] | None = None
        self._values: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.older) + len(self.newer)

    def values(
        self, tiles: dict[int, Tile], buckets: list[int], start: int, end: int
    ) -> dict[str, Any]:
        """The values of the window [start, end); ``buckets``: the sorted buckets of ``tiles``.
        Ends only move forward, and every tile before ``end`` is final."""
        if self.last is not None and self.last >= end:  # ends went back: not a cache of these
            self._reset()
        first = bisect_left(buckets, start)
        if self.last is not None:
            first = max(first, bisect_right(buckets, self.last))
        for bucket in buckets[first : bisect_left(buckets, end)]:
            self._push(bucket, tiles[bucket])
        self._evict(start)
        content = (self._oldest(), self.last, len(self))
        if content == self._content:
            return self._values  # the same tiles as at the previous end
        out: dict[str, Any] = {}
        top = self.older[-1][1] if self.older else None
        for i, (name, _, aggregator) in enumerate(self._merged):
            older = None if top is None else top[i]
            out[name] = aggregator.result(_merge(aggregator, older, self.newer_merged[i]))
        for (name, _), counts in zip(self._distinct, self.counts, strict=True):
            out[name] = len(counts)
        self._content, self._values = content, out
        return out

    def _oldest(self) -> int | None:
        if self.older:
            return self.older[-1][0]
        return self.newer[0][0] if self.newer else None

    def _push(self, bucket: int, tile: Tile) -> None:
        self.last = bucket
        self.newer.append((bucket, tile))
        merged = self.newer_merged
        for i, (_, slot, aggregator) in enumerate(self._merged):
            merged[i] = _merge(aggregator, merged[i], tile[slot])
        for (_, slot), counts in zip(self._distinct, self.counts, strict=True):
            if tile[slot] is not None:
                counts.update(tile[slot])

    def _evict(self, start: int) -> None:
        """Drop the tiles before ``start``, oldest first."""
        while True:
            if not self.older:
                if not self.newer or self.newer[0][0] >= start:
                    return
                self._flip()
            if self.older[-1][0] >= start:
                return
            _, _, tile = self.older.pop()
            for (_, slot), counts in zip(self._distinct, self.counts, strict=True):
                for value in tile[slot] or ():
                    counts[value] -= 1
                    if counts[value] <= 0:
                        del counts[value]

    def _flip(self) -> None:
        """Move the newer stack onto the older one: each tile merged with every newer one."""
        running: list[Any] = [None] * len(self._merged)
        for bucket, tile in reversed(self.newer):
            running = [
                _merge(aggregator, tile[slot], running[i])
                for i, (_, slot, aggregator) in enumerate(self._merged)
            ]
            self.older.append((bucket, running, tile))
        self.newer = []
        self.newer_merged = [None] * len(self._merged)


Queues = dict[int, WindowQueue]


def _merge(aggregator: Aggregator[Any], a: Any, b: Any) -> Any:
    """Two partial states (None: no values) merged, ``a`` the older; arguments unchanged."""
    if a is None:
        return b
    if b is None:
        return a
    return aggregator.merge(a, b)
