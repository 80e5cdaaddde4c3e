"""The tile engine's keyed state: one Flink state entry per tile, decoded tiles cached in Python.

Before, a key's whole window state (streaming/windows.py: [next_end, {bucket: tile}]) was one
pickled ValueState, read and rewritten on every tile row and every firing: fine for an hour of
1-minute tiles, but 0.8 MB and about 55 ms per key per minute at 43,200 tiles (30 days on
1-minute slides). Now:

  tiles      MapState bucket -> tile: a tile row writes its own tile only, a firing removes
             the tiles it evicted (usually one) and nothing else;
  next_end   ValueState: the first window end not yet final (an int).

That layout does not pay for short windows: bench.stream's tiles-map against tiles (the
example views' 1-hour and 10-minute windows, 100k events, one run, 2026-12-05, load 6-11):
CPU per event 0.98x, events/s 0.74x, full run 1.21x, peak RSS 3.3 GB against 2.4 GB (separate
runs gave 117 and 119 us of CPU per event with MapState, 96-150 us with the one value: the
shared machine's noise is larger than the difference). A view whose largest window
has at most MAP_STATE_FROM_TILES slides keeps the one pickled value (WholeKeyStates, the
previous layout, unchanged); a longer one uses MapState (KeyStates). tile_layout picks.

Python keeps the decoded state of recently used keys (KeyCache, least recently used out when
it holds more than ``capacity`` tiles), with the key's window memo and WindowQueues (the
cached merges of long windows, streaming/windows.py). Every change goes to Flink's state as it
is made, so the cache is never needed for correctness: a key not in it (a restore, a new
worker, an evicted key) is read back from the two states and its memo and queues start empty.
Flink's state is scoped to the current key, set by Flink before process_element and on_timer.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

from streaming.compile import CompiledView
from streaming.windows import QUEUE_FROM_TILES, Memo, Queues, SortedTiles, State, new_state

# Decoded tiles kept in Python across keys: about 100-300 bytes each (more for count_distinct).
DEFAULT_CAPACITY_TILES = 500_000
# Largest windows of more slides than this keep one state entry per tile (module docstring).
MAP_STATE_FROM_TILES = QUEUE_FROM_TILES


class MapLike(Protocol):
    """What KeyStates uses of PyFlink's MapState (pyflink.datastream.state.MapState)."""

    def put(self, key: Any, value: Any) -> None: ...
    def remove(self, key: Any) -> None: ...
    def items(self) -> Any: ...
    def clear(self) -> None: ...


class ValueLike(Protocol):
    """What KeyStates uses of PyFlink's ValueState."""

    def value(self) -> Any: ...
    def update(self, value: Any) -> None: ...
    def clear(self) -> None: ...


class TrackedTiles(SortedTiles):
    """A key's tiles, in order (SortedTiles), remembering which buckets were deleted
    (WindowEngine.fire evicts spent tiles by ``del``), so that only those leave the MapState."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.deleted: list[int] = []

    def __delitem__(self, bucket: int) -> None:
        super().__delitem__(bucket)
        self.deleted.append(bucket)


@dataclass
class Cached:
    """One key's decoded state and what is derived from it."""

    state: State
    memo: Memo = field(default_factory=dict)
    queues: Queues = field(default_factory=dict)


class KeyStates:
    """The current key's window state (see the module docstring)."""

    def __init__(self, tiles: MapLike, next_end: ValueLike, capacity: int | None = None) -> None:
        self._tiles = tiles
        self._next_end = next_end
        self._capacity = DEFAULT_CAPACITY_TILES if capacity is None else capacity
        self._cache: OrderedDict[str, Cached] = OrderedDict()
        self._held = 0  # tiles in the cache, as of each key's last use
        self._sizes: dict[str, int] = {}
        self.reads = 0  # keys read back from Flink's state (cache misses)

    def get(self, key: str) -> Cached:
        """The current key's state (an empty one for a new key)."""
        cached = self._cache.get(key)
        if cached is None:
            self.reads += 1
            stored = sorted(self._tiles.items())
            state = new_state()
            state[0] = self._next_end.value() if stored else None
            state[1] = TrackedTiles(stored)
            cached = self._cache[key] = Cached(state)
        else:
            self._cache.move_to_end(key)
        return cached

    def tile_changed(self, key: str, cached: Cached, bucket: int) -> None:
        """A tile row changed (or added) the tile of ``bucket``."""
        self._tiles.put(bucket, cached.state[1][bucket])
        self._account(key, cached)

    def fired(self, key: str, cached: Cached) -> None:
        """A firing advanced next_end and evicted tiles: write both."""
        tiles: TrackedTiles = cached.state[1]
        for bucket in tiles.deleted:
            self._tiles.remove(bucket)
        tiles.deleted.clear()
        self._next_end.update(cached.state[0])
        self._account(key, cached)

    def clear(self, key: str) -> None:
        """The key is idle: no tile left, its state goes."""
        self._tiles.clear()
        self._next_end.clear()
        self._held -= self._sizes.pop(key, 0)
        self._cache.pop(key, None)

    def _account(self, key: str, cached: Cached) -> None:
        size = len(cached.state[1])
        self._held += size - self._sizes.get(key, 0)
        self._sizes[key] = size
        while self._held > self._capacity and len(self._cache) > 1:
            old, _ = self._cache.popitem(last=False)
            self._held -= self._sizes.pop(old, 0)

    def __len__(self) -> int:
        return len(self._cache)


class WholeKeyStates:
    """The current key's window state as one pickled ValueState, read on every tile row and
    firing (PyFlink caches recent keys' values) and rewritten after: the layout for short
    windows. The memo of window values is kept per key in Python (a cache)."""

    def __init__(self, value: ValueLike) -> None:
        self._value = value
        self._memos: dict[str, Memo] = {}

    def get(self, key: str) -> Cached:
        return Cached(self._value.value() or new_state(), self._memos.setdefault(key, {}))

    def tile_changed(self, key: str, cached: Cached, bucket: int) -> None:
        self._value.update(cached.state)

    def fired(self, key: str, cached: Cached) -> None:
        self._value.update(cached.state)

    def clear(self, key: str) -> None:
        self._value.clear()
        self._memos.pop(key, None)


def uses_map_state(compiled: CompiledView) -> bool:
    """Whether the view's tiles go one state entry each (KeyStates) rather than one pickled
    value per key (WholeKeyStates)."""
    return compiled.max_window_ms // compiled.slide_ms > MAP_STATE_FROM_TILES


def tile_layout(compiled: CompiledView, runtime_context: Any) -> KeyStates | WholeKeyStates:
    """The keyed state of one view's tile function, in the layout its windows call for."""
    from pyflink.common import Types
    from pyflink.datastream.state import MapStateDescriptor, ValueStateDescriptor

    if not uses_map_state(compiled):
        whole = ValueStateDescriptor("tiles", Types.PICKLED_BYTE_ARRAY())
        return WholeKeyStates(runtime_context.get_state(whole))
    tiles = MapStateDescriptor("tiles", Types.LONG(), Types.PICKLED_BYTE_ARRAY())
    next_end = ValueStateDescriptor("next_end", Types.LONG())
    return KeyStates(runtime_context.get_map_state(tiles), runtime_context.get_state(next_end))
