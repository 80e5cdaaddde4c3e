"""The stream's progress records (topic sluice.stream-stats): each operator instance's cumulative
counters, written by streaming/sinks.py and read by streaming/monitor.py and `sluice stream`.

The counters count one run. An engine whose counters are part of the job's checkpointed state
(the tile engine, streaming/tile_counts.py) also writes ``restored``: the CARRIED counters as
they stood in the snapshot the run restored from (zeros for a fresh start), so that restored +
the run's counters are the job's totals over every run. Records without it (older records,
the event engine) carry nothing: their runs start from zero."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from core.record_fields import Fields


@dataclass(slots=True)
class PrepareCounts:
    """Cumulative counters of one prepare instance (parse, filter, late check)."""

    events: int = 0
    late: int = 0
    filtered: int = 0
    rejected: int = 0  # dead-lettered for another reason than late (bypassed ingest)
    heartbeats: int = 0  # heartbeat records read and dropped: not events, not in `events`
    first_at_ms: int = 0
    last_at_ms: int = 0
    watermark: int | None = None
    # partition -> next offset to read
    offsets: dict[int, int] = dataclasses.field(default_factory=dict)


@dataclass(slots=True)
class WindowCounts:
    """Cumulative counters of one window instance."""

    aggregated: int = 0  # events added to a key's tiles
    duplicates: int = 0  # events whose id the key's tile already held: counted once
    # The tile engine only: events read whose tile has not closed yet (they wait in the SQL
    # window state, a snapshot carries them to the next run); below zero when the run closed
    # more restored tiles' events than it left open (streaming/tile_functions.py).
    open: int = 0


@dataclass(slots=True)
class PublishCounts:
    """Cumulative counters of the rows one window instance wrote."""

    rows: int = 0
    online_written: int = 0
    online_skipped_older: int = 0
    max_end_ms: int | None = None
    watermark: int | None = None


StageCounts = PrepareCounts | WindowCounts | PublishCounts
# The counters a snapshot carries to the next run (what `restored` holds), per kind of counts.
CARRIED: dict[type, tuple[str, ...]] = {
    PrepareCounts: ("events", "late", "filtered", "rejected", "heartbeats"),
    WindowCounts: ("aggregated", "duplicates", "open"),
    PublishCounts: ("rows",),
}


def carried(counts: StageCounts) -> dict[str, int]:
    """The counters of ``counts`` that a snapshot carries."""
    return {name: getattr(counts, name) for name in CARRIED.get(type(counts), ())}


# The "op" of a stats record names which counters it carries.
_COUNTS: dict[str, type[PrepareCounts] | type[WindowCounts] | type[PublishCounts]] = {
    "prepare": PrepareCounts,
    "windows": WindowCounts,
    "publish": PublishCounts,
}
_OPS = {cls: op for op, cls in _COUNTS.items()}
_COUNTER_NAMES = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _OPS}
# How each counter is read back, by its annotation.
_COUNT_READERS: dict[str, Callable[[Fields, str], Any]] = {
    "int": Fields.integer,
    "int | None": Fields.opt_integer,
    "dict[int, int]": Fields.int_map,
}
# Counters added after version 1 was written: records without them read as 0.
_ADDED_COUNTERS = frozenset({"heartbeats", "duplicates", "open"})


@dataclass(slots=True)
class StreamStats:
    """Counters of one operator instance of one run; the newest record per instance wins.

    JSON: the head (run, view, op, subtask) and the counters side by side, then final and at_ms,
    then ``restored`` when the engine carries counters across runs (module docstring).
    """

    KIND: ClassVar[str] = "stream stats"
    VERSION: ClassVar[int] = 1

    run: str
    view: str
    subtask: int
    counts: StageCounts
    final: bool  # the instance closed: these counts are its last
    at_ms: int  # wall clock of the report
    # CARRIED counters of the snapshot this run restored from (zeros: a fresh start); None: the
    # engine does not carry counters (or has not read them yet): the run started from zero.
    restored: dict[str, int] | None = None
    v: int = VERSION

    @property
    def op(self) -> str:
        return _OPS[type(self.counts)]

    @property
    def instance(self) -> tuple[str, str, int]:
        return self.view, self.op, self.subtask

    def encode(self) -> bytes:
        c = self.counts
        record = {"v": self.VERSION, "run": self.run, "view": self.view, "op": self.op}
        record["subtask"] = self.subtask
        record |= {name: getattr(c, name) for name in _COUNTER_NAMES[type(c)]}
        record |= {"final": self.final, "at_ms": self.at_ms}
        if self.restored is not None:
            record["restored"] = self.restored
        return orjson.dumps(record, option=orjson.OPT_NON_STR_KEYS)

    @classmethod
    def decode(cls, data: bytes | None) -> StreamStats:
        f = Fields(cls.KIND, data, cls.VERSION)
        op = f.text("op")
        counts_type = _COUNTS.get(op)
        if counts_type is None:
            f.fail("op", f"{op!r} is not one of {', '.join(_COUNTS)}")
        counters = {
            c.name: _COUNT_READERS[str(c.type)](f, c.name)
            for c in dataclasses.fields(counts_type)
            if c.name not in _ADDED_COUNTERS or c.name in f.obj
        }
        return cls(
            run=f.text("run"),
            view=f.text("view"),
            subtask=f.integer("subtask"),
            counts=counts_type(**counters),
            final=f.boolean("final"),
            at_ms=f.integer("at_ms"),
            restored=_restored(f, counts_type) if "restored" in f.obj else None,
            v=f.version,
        )


def _restored(f: Fields, counts_type: type) -> dict[str, int]:
    """The ``restored`` object: an integer for each counter its kind of counts carries."""
    names = CARRIED.get(counts_type, ())
    values = f.opt_integers("restored")
    for name, value in values.items():
        if name not in names:
            f.fail(f"restored.{name}", f"not a counter that {f.text('op')} records carry")
        if value is None:
            f.fail(f"restored.{name}", "expected an integer, got null")
    return {name: int(values.get(name) or 0) for name in names}
