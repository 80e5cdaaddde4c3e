"""The tile engine's counters as job state: they continue from a snapshot after a restore.

Every counter of a view's prepare and windows records (core/stream_stats.CARRIED: events,
heartbeats, late, filtered, rejected, aggregated, duplicates, open) changes only on rows the
SQL (streaming/tiles.py) sends under the side key (tile_state.SIDE_KEY): read rows (events
read, per partition and 100 ms), side rows (heartbeats, late and unreadable events), the
filter's rows (events the view drops, per partition and slide) and closed rows (per slide,
the kept events of the tiles that closed: aggregated + duplicates). Tile rows, under
their entities' shards, count nothing. So one operator instance counts them all, and after each
such row it writes the job's totals (what it restored + this run's counts) into the side key's
keyed state: a checkpoint or savepoint holds them as of its barrier, as it holds the SQL's
offsets and windows. A run that restores the snapshot reads them back with its first side-key
row and reports them as ``restored`` beside its own counts (which start from zero, as before):
restored + run = the totals, and both balance (events == processed + open).

Why this design (issue 11):
  - PyFlink's Python functions have keyed state only (no operator ListState), and nothing runs
    under a key at a bundle's end, so counters must change where a key is current. Routing
    every counting row to one reserved key makes the counts one key's state; their rate is per
    partition and 100 ms, or per slide, not per event.
  - Counters per entity key (aggregated, duplicates on tile rows) could not be summed after a
    restore: keyed state cannot be iterated. The closed rows move that count into the SQL
    (a window aggregation over the tiles, per slide), so it arrives under the side key.
  - Cumulative counts in a non-windowed SQL GROUP BY would emit an update stream (retractions)
    into the DataStream and could not count what Python decides (late, filtered or rejected
    for an event the SQL decode cannot read, heartbeats).
The rows written (PublishCounts.rows) are carried too, but not here: rows are written by the
timers of every shard key, and a count kept under another key would miss the rows between its
last update and a barrier. Each shard counts its own in its state instead (tile_state.ROWS_ENTRY),
and the run sums them as it reads the shards back (``restored`` of the publish records).
"""

from __future__ import annotations

from typing import Any

from core.stream_stats import CARRIED, PrepareCounts, WindowCounts, carried
from streaming.sinks import StatsReporter


class CarriedCounts:
    """Keeps one instance's prepare and windows counters in the side key's state (``state``:
    value/update of pickled objects, read and written only while the side key is current; the
    tile function's is an entry of its one MapState, tile_state.MapEntry)."""

    def __init__(
        self, state: Any, read: PrepareCounts, windows: WindowCounts, stats: StatsReporter
    ) -> None:
        self._state = state
        self._read = read
        self._windows = windows
        self._stats = stats
        self.restored: dict[str, int] | None = None  # None: not read from the state yet

    def load(self) -> None:
        """Before the first count of the run: the totals the snapshot held (none: zeros)."""
        if self.restored is not None:
            return
        saved = self._state.value() or {}
        names = [name for kind in (PrepareCounts, WindowCounts) for name in CARRIED[kind]]
        self.restored = {name: int(saved.get(name, 0)) for name in names}
        for kind in (PrepareCounts, WindowCounts):
            self._stats.restored(kind, {name: self.restored[name] for name in CARRIED[kind]})

    def save(self) -> None:
        """After a count: the job's totals, as of this row, into the state."""
        assert self.restored is not None, "load() first"
        now = carried(self._read) | carried(self._windows)
        self._state.update({name: n + now[name] for name, n in self.restored.items()})
