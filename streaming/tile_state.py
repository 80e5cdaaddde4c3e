"""The tile engine's keyed state: entities grouped into shards, one Flink state entry per tile.

Flink keys the tile function by shard (a CRC-32 of the entity modulo SHARDS, computed in the
SQL by streaming/java/sluice/Shard.java; shard_of is its Python twin), not by entity. Per
shard, in Flink's keyed state:

  tiles      MapState "bucket|entity" -> tile: a tile row writes its own tile only, a firing
             removes the tiles it evicted and nothing else. Beside the tiles, in the same map
             (one state per key: PyFlink pays per state at every key switch and every bundle
             end, a synchronous write per changed state and key):
               NEXT_ENTRY  the first window end the shard has not fired yet (an int);
               ROWS_ENTRY  the rows the shard's firings wrote, over every run (statistics that
                           survive a restore, below);
               the side key's counters (tile_counts.py), under COUNTS_ENTRY.

and one event-time timer: the earliest end any of its entities has due. A firing walks the
shard's entities and fires those with an end due (fire_shard). Why shards (issue 11): keyed by
entity, every entity with a row due took a timer of its own at every watermark step (each a
Beam round trip into Python with its key switch, state read and write), and every firing
rewrote the entity's next end. bench.stream's 400k events (212 entities, two views) ran about
60,000 such timers beside 70,000 tile rows. By shard, a watermark step costs a timer per
shard, and a firing writes the shard's next end once: an entity's next end is the shard's
(below), so a firing writes nothing per entity but the tiles it evicts.

An entity's next end is its shard's. WindowEngine keeps a next end per key (state[0]: the first
end not yet final); here every entity of a shard is fired at the same firings, to the same end,
and an entity not due at a firing has nothing before its first tile's end, which is at or past
the shard's next end, so giving it the shard's changes no row (WindowEngine.fire starts at
max(next_end, first bucket's end)). Tiles arrive before the watermark reaches their end (the
SQL's windows emit them before passing the watermark on), so a new tile is never before it.

Python keeps the decoded state of recently used shards (least recently used out when they hold
more than ``capacity`` tiles), with each entity's window memo and WindowQueues (the cached
merges of long windows, streaming/windows.py). Every change goes to Flink's state as it is
made, so the cache is never needed for correctness: a shard not in it (a restore, a new worker,
an evicted shard) is read back from its map and its memos and queues start empty.
Flink's state is scoped to the current key, set by Flink before process_element and on_timer.

Rows written survive a restore. A firing adds the rows it wrote to its shard's ROWS_ENTRY, in
the same key's state as the tiles it evicted, so a checkpoint holds, per shard, the rows of
exactly the firings before its barrier (their rows are written at the bundle's end, before the
snapshot: streaming/functions.py). A restored run reads a shard's count when it first reads the
shard back and sums those counts (``restored_rows``), once per shard: a shard read back again
after the cache dropped it holds this run's rows too. Every shard read back is counted; the
tile function makes sure each is read back soon after a restore (a processing-time timer per
shard, tile_functions.py), not only when its next tile or firing comes.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from streaming.windows import Memo, Queues, SortedTiles, State, WindowEngine, prune_memo

# Decoded tiles kept in Python across shards: about 100-300 bytes each (more for count_distinct).
DEFAULT_CAPACITY_TILES = 500_000
# Shards per view. The tile function's parallelism cannot usefully exceed it, and it is part of
# the state's layout (streaming/job.job_dir: a change starts afresh). More shards: more timers
# per watermark step (one per shard with a row due); fewer: larger shards to walk per firing
# and to read back after a restore.
SHARDS = 32
# The key of the rows that count (read, side, closed and the filter's rows): no entity's tiles
# live under it, the counters do (streaming/tile_counts.py).
SIDE_KEY = -1
_SEPARATOR = "|"
# The map's entries that are not tiles (a tile's starts with its bucket, a number).
NEXT_ENTRY = "#next"
ROWS_ENTRY = "#rows"
COUNTS_ENTRY = "#counts"


def shard_of(entity: str | None) -> int:
    """The shard of an entity's tiles (SIDE_KEY for rows without one), as the SQL's
    sluice_shard computes it (tests/integration/test_stream_shards.py holds the two equal)."""
    if entity is None:
        return SIDE_KEY
    return zlib.crc32(entity.encode()) % SHARDS


class MapLike(Protocol):
    """What ShardStates uses of PyFlink's MapState (pyflink.datastream.state.MapState)."""

    def get(self, key: Any) -> Any: ...
    def put(self, key: Any, value: Any) -> None: ...
    def remove(self, key: Any) -> None: ...
    def items(self) -> Any: ...


class MapEntry:
    """One entry of a MapState as a ValueState (value, update, clear)."""

    def __init__(self, state: MapLike, entry: str) -> None:
        self._state = state
        self._entry = entry

    def value(self) -> Any:
        return self._state.get(self._entry)

    def update(self, value: Any) -> None:
        self._state.put(self._entry, value)

    def clear(self) -> None:
        self._state.remove(self._entry)


class TrackedTiles(SortedTiles):
    """An entity's tiles, in order (SortedTiles), remembering which buckets were deleted
    (WindowEngine.fire evicts spent tiles by ``del``), so that only those leave the MapState."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.deleted: list[int] = []

    def __delitem__(self, bucket: int) -> None:
        super().__delitem__(bucket)
        self.deleted.append(bucket)


@dataclass
class Cached:
    """One entity's decoded state and what is derived from it."""

    state: State
    memo: Memo = field(default_factory=dict)
    queues: Queues = field(default_factory=dict)


@dataclass
class Shard:
    """One shard's entities (those with tiles), as held in Python."""

    key: int
    next_end: int | None = None  # the first window end not fired yet (None: never fired)
    entities: dict[str, Cached] = field(default_factory=dict)
    # The earliest event-time timer this process registered for the shard and has not seen
    # fire. Not state: a restored shard starts without, and registers again (Flink restored
    # its timers; a repeat of one is dropped).
    pending: int | None = None
    tiles: int = 0  # tiles held, for the cache's bound
    rows: int = 0  # rows its firings wrote, over every run (its ROWS_ENTRY)
    # Whether this process registered the shard's processing-time timer (tile_functions.py).
    # Not state, as ``pending``.
    ticking: bool = False


def _entry(bucket: int, entity: str) -> str:
    return f"{bucket}{_SEPARATOR}{entity}"


class ShardStates:
    """The shards' window state (see the module docstring)."""

    def __init__(self, tiles: MapLike, capacity: int | None = None) -> None:
        self._tiles = tiles
        self._capacity = DEFAULT_CAPACITY_TILES if capacity is None else capacity
        self._cache: OrderedDict[int, Shard] = OrderedDict()
        self._held = 0  # tiles in the cache
        self.reads = 0  # shards read back from Flink's state (cache misses)
        self._read_once: set[int] = set()  # shards whose rows written were read back
        # Rows written by the shards read back so far, as their state held them at the start
        # of this run (the snapshot's: 0 for a fresh start).
        self.restored_rows = 0

    def shard(self, key: int) -> Shard:
        """The shard of the current key (read back from Flink's state when not cached)."""
        shard = self._cache.get(key)
        if shard is not None:
            self._cache.move_to_end(key)
            return shard
        self.reads += 1
        shard = self._cache[key] = Shard(key)
        by_entity: dict[str, list[tuple[int, Any]]] = {}
        for entry, tile in self._tiles.items():
            if entry.startswith("#"):
                if entry == NEXT_ENTRY:
                    shard.next_end = int(tile)
                elif entry == ROWS_ENTRY:
                    shard.rows = int(tile)
                continue
            bucket, _, entity = entry.partition(_SEPARATOR)
            by_entity.setdefault(entity, []).append((int(bucket), tile))
        for entity, tiles in by_entity.items():
            shard.entities[entity] = Cached([shard.next_end, TrackedTiles(tiles)])
            shard.tiles += len(tiles)
        if key not in self._read_once:
            self._read_once.add(key)
            self.restored_rows += shard.rows
        self._held += shard.tiles
        self._bound(shard)
        return shard

    def entity(self, shard: Shard, entity: str) -> Cached:
        """An entity's state in its shard (an empty one at the shard's next end when new)."""
        cached = shard.entities.get(entity)
        if cached is None:
            cached = shard.entities[entity] = Cached([shard.next_end, TrackedTiles()])
        return cached

    def tile_changed(
        self, shard: Shard, entity: str, cached: Cached, bucket: int, new: bool
    ) -> None:
        """A tile row changed (``new``: added) the entity's tile of ``bucket``."""
        self._tiles.put(_entry(bucket, entity), cached.state[1][bucket])
        if new:
            shard.tiles += 1
            self._held += 1
            self._bound(shard)

    def fired(self, shard: Shard, entity: str, cached: Cached) -> None:
        """A firing evicted tiles of the entity: remove them; an entity left without tiles
        leaves the shard."""
        tiles: TrackedTiles = cached.state[1]
        for bucket in tiles.deleted:
            self._tiles.remove(_entry(bucket, entity))
        shard.tiles -= len(tiles.deleted)
        self._held -= len(tiles.deleted)
        tiles.deleted.clear()
        if not tiles:
            del shard.entities[entity]

    def rows_written(self, shard: Shard, rows: int) -> None:
        """A firing of the shard wrote ``rows`` rows."""
        if rows:
            shard.rows += rows
            self._tiles.put(ROWS_ENTRY, shard.rows)

    def shard_fired(self, shard: Shard, next_end: int) -> None:
        """The shard fired every end before ``next_end``. A shard left without entities
        forgets it (a new entity's first end is its first tile's, as before any firing; at
        the end of the input, the end after Flink's last watermark is past a long)."""
        if not shard.entities:
            if shard.next_end is not None:
                shard.next_end = None
                self._tiles.remove(NEXT_ENTRY)
        elif shard.next_end is None or next_end > shard.next_end:
            shard.next_end = next_end
            self._tiles.put(NEXT_ENTRY, next_end)

    def _bound(self, current: Shard) -> None:
        while self._held > self._capacity and len(self._cache) > 1:
            key, oldest = next(iter(self._cache.items()))
            if oldest is current:
                self._cache.move_to_end(key)
                continue
            del self._cache[key]
            self._held -= oldest.tiles

    def __len__(self) -> int:
        return len(self._cache)


def fire_shard(
    engine: WindowEngine,
    states: ShardStates,
    shard: Shard,
    upto: int,
    emit: Callable[[str, int, dict[str, Any]], None],
) -> int | None:
    """Fire every entity of ``shard`` with an end due by ``upto`` (a timer's time or the
    watermark: every end at or before it is final), emitting its rows in order; the shard's
    next timer (None: no entity has tiles left)."""
    slide = engine.slide
    following: int | None = None
    rows = 0
    for entity, cached in list(shard.entities.items()):
        due = engine.next_timer(cached.state)
        if due is not None and due <= upto:
            for end, values in engine.fire(cached.state, upto, cached.memo, cached.queues):
                emit(entity, end, values)
                rows += 1
            states.fired(shard, entity, cached)
            if entity not in shard.entities:
                continue
            prune_memo(cached.memo, cached.state)
            due = engine.next_timer(cached.state)
        if due is not None and (following is None or due < following):
            following = due
    states.rows_written(shard, rows)
    states.shard_fired(shard, upto - upto % slide + slide)
    return following
