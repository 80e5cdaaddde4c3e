"""Event history as parquet: the offline copy of the event streams that Spark and Feast read.

Layout: ``root/<source>/date=YYYY-MM-DD/part-*.parquet``, hive-style partitions by the UTC
date of the event time, one typed column per declared field (no partition column inside the
files; engines add ``date`` from the path). Two writers use it:

- ``write_history`` (the simulator, ``sluice produce --history``): ``part-NNNNN.parquet``,
  idempotent per partition: a date that a call writes has its simulator parts replaced.
- the archiver (events/archive.py, ``sluice archive``): the events topics, exactly once by
  offsets. Its parts are named by ``PartName`` (topic, partition, offset range, i of n) and
  carry the columns ``_topic``, ``_partition``, ``_offset``, ``_arrival_ms`` and ``_event_id``
  (events/identity.py) after the declared ones. Marks of events the stream dead-lettered as too
  late for a view live in ``root/_late/<source>/part-*.parquet`` (``LATE_SCHEMA``).

Readers take declared columns; from archive parts they drop repeated ``_event_id``s (a replayed
event) keeping the first by (topic, partition, offset), and, for a view, the events marked late.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from events.errors import ArchiveLayoutError
from features.schema import EventSource, FieldType

log = logging.getLogger("sluice.history")

DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class SourceEvent:
    """One event of a source: ``payload`` holds exactly the source's declared fields."""

    source: str
    key: str
    event_time_ms: int
    payload: dict[str, Any]

    def to_json(self) -> bytes:
        return orjson.dumps(self.payload)


_ARROW_TYPES: dict[FieldType, Any] = {
    FieldType.STRING: pa.string(),
    FieldType.INT: pa.int64(),
    FieldType.FLOAT: pa.float64(),
    FieldType.BOOL: pa.bool_(),
    FieldType.TIMESTAMP: pa.timestamp("ms", tz="UTC"),
}


def arrow_type(field_type: FieldType, timestamp_unit: str = "ms") -> Any:
    """The one map from the definition language's types to Arrow's. The history keeps event
    times in ms (events carry ms); Spark writes the offline store's timestamps in us."""
    if field_type is FieldType.TIMESTAMP:
        return pa.timestamp(timestamp_unit, tz="UTC")
    return _ARROW_TYPES[field_type]


def arrow_schema(source: EventSource) -> pa.Schema:
    """The parquet schema of a source: declared fields in order, nullable as declared."""
    return pa.schema(
        [pa.field(f.name, _ARROW_TYPES[f.type], nullable=f.nullable) for f in source.fields]
    )


def partition_dir(root: Path, source: EventSource, day: int) -> Path:
    """The directory of one source's events on one UTC day (days since the epoch)."""
    date = datetime.fromtimestamp(day * 86_400, tz=UTC).date().isoformat()
    return root / source.name / f"date={date}"


def _timestamp_array(values: Sequence[Any]) -> pa.Array:
    # Payloads carry ISO-8601 strings (or epoch ms); Arrow parses a column of either in C.
    target = pa.timestamp("ms", tz="UTC")
    try:
        return pa.array(values, pa.string()).cast(target)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass  # epoch ms, or times with more than millisecond precision: convert one by one
    epoch_ms = [
        int(datetime.fromisoformat(v).timestamp() * 1000) if isinstance(v, str) else v
        for v in values
    ]
    return pa.array(epoch_ms, pa.int64()).cast(target)


class _HistoryWriter:
    """Buffers payloads per (source, day) and writes each buffer as one parquet part."""

    def __init__(self, root: Path, sources: Sequence[EventSource], batch_rows: int) -> None:
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        self.root = root
        self.sources = {s.name: s for s in sources}
        self.batch_rows = batch_rows
        # Bound on rows held across all partitions, for streams that interleave many dates.
        self.max_buffered = 2 * batch_rows
        self.pending: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self.parts_written: dict[tuple[str, int], int] = {}
        self.buffered = 0
        self.rows_written = {s.name: 0 for s in sources}

    def add(self, event: SourceEvent) -> None:
        key = (event.source, event.event_time_ms // DAY_MS)
        rows = self.pending.get(key)
        if rows is None:
            if event.source not in self.sources:
                return  # a source the caller did not ask for
            rows = self.pending[key] = []
        # Payload dicts are kept as they are: building columns in one pass at flush time is
        # cheaper than appending to a list per field for every event.
        rows.append(event.payload)
        self.buffered += 1
        if len(rows) >= self.batch_rows:
            self.flush(key)
        elif self.buffered > self.max_buffered:
            self.flush(max(self.pending, key=lambda k: len(self.pending[k])))

    def flush(self, key: tuple[str, int]) -> None:
        rows = self.pending.pop(key, None)
        if not rows:
            return
        source = self.sources[key[0]]
        part = self.parts_written.get(key, 0)
        directory = partition_dir(self.root, source, key[1])
        if part == 0 and directory.exists():
            # First write of this date in this call: replace the day's simulator parts. The
            # archiver's parts (and its temp files) stay: they are another writer's data.
            for old in [*directory.glob("part-*.parquet"), *directory.glob(".part-*.tmp")]:
                if parse_part_name(old.name.removeprefix(".").removesuffix(".tmp")) is None:
                    old.unlink()
        directory.mkdir(parents=True, exist_ok=True)
        arrays = []
        for field in source.fields:
            name = field.name
            try:
                values = [row[name] for row in rows]
            except KeyError:
                raise ValueError(f"{source.name}.{name}: missing in some events") from None
            if field.type is FieldType.TIMESTAMP:
                array = _timestamp_array(values)
            else:
                array = pa.array(values, _ARROW_TYPES[field.type])
            if array.null_count and not field.nullable:
                raise ValueError(f"{source.name}.{field.name}: null in some events")
            arrays.append(array)
        table = pa.Table.from_arrays(arrays, schema=arrow_schema(source))
        final = directory / f"part-{part:05d}.parquet"
        # Readers skip dot-files, so they never see a half-written part.
        temporary = directory / f".{final.name}.tmp"
        pq.write_table(table, temporary)
        os.replace(temporary, final)
        self.parts_written[key] = part + 1
        self.rows_written[source.name] += len(rows)
        self.buffered -= len(rows)

    def close(self) -> None:
        for key in list(self.pending):
            self.flush(key)


def write_history(
    events: Iterable[SourceEvent],
    root: Path,
    sources: Sequence[EventSource],
    batch_rows: int = 100_000,
) -> dict[str, int]:
    """Write events of ``sources`` as parquet under ``root``; returns rows written per source.

    Streams: at most about ``2 * batch_rows`` rows are held in memory. Events of other sources
    are skipped. Every date partition that receives rows is deleted before its first part is
    written, so a call replaces whole days and leaves other days alone.
    """
    writer = _HistoryWriter(root, sources, batch_rows)
    for event in events:
        writer.add(event)
    writer.close()
    return writer.rows_written


def read_history(root: Path, source: EventSource, view: str | None = None) -> pa.Table:
    """All history of one source, ordered by date then part; declared columns only.

    Archive parts: an event delivered twice (same ``_event_id``) is kept once, at its first
    (topic, partition, offset); with ``view``, events the stream marked late for that view are
    left out. Simulator parts are read as they are.
    """
    schema = arrow_schema(source)
    parts = sorted((root / source.name).glob("date=*/part-*.parquet"))
    plain = [p for p in parts if parse_part_name(p.name) is None]
    archived = [p for p in parts if parse_part_name(p.name) is not None]
    tables = [pq.read_table(part, schema=schema) for part in plain]
    if archived:
        wide = archive_schema(source)
        table = pa.concat_tables([pq.read_table(part, schema=wide) for part in archived])
        table = first_per_event(table)
        if view is not None:
            table = drop_marked(table, read_late_marks(root, source.name, view))
        tables.append(table.select(schema.names))
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)


# -- archive parts ---------------------------------------------------------------------------

TOPIC, PARTITION, OFFSET, ARRIVAL_MS, EVENT_ID = (
    "_topic",
    "_partition",
    "_offset",
    "_arrival_ms",
    "_event_id",
)
ARCHIVE_FIELDS = (
    pa.field(TOPIC, pa.string(), nullable=False),
    pa.field(PARTITION, pa.int32(), nullable=False),
    pa.field(OFFSET, pa.int64(), nullable=False),
    pa.field(ARRIVAL_MS, pa.int64(), nullable=False),
    pa.field(EVENT_ID, pa.string(), nullable=False),
)
# One row per (view, event) the stream dead-lettered as too late for that view.
LATE_DIR = "_late"
LATE_SCHEMA = pa.schema(
    [
        pa.field("view", pa.string(), nullable=False),
        pa.field("topic", pa.string(), nullable=False),
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("event_id", pa.string(), nullable=False),
    ]
)
ARCHIVE_DIR = "_archive"  # the archiver's lock file and its progress parts
PROGRESS_DIR = "progress"
# Parquet key-value metadata of every archive part: the same facts as its name, as JSON.
PART_METADATA_KEY = b"sluice.archive"
_PART_NAME = re.compile(
    r"^part-(?P<topic>[A-Za-z0-9._-]+)\.p(?P<partition>\d+)\.o(?P<first>\d+)-(?P<last>\d+)"
    r"\.g(?P<index>\d+)of(?P<count>\d+)\.parquet$"
)


def archive_schema(source: EventSource) -> pa.Schema:
    """Declared columns, then where each event was read from and its identity."""
    return pa.schema([*arrow_schema(source), *ARCHIVE_FIELDS])


def late_dir(root: Path, source_name: str) -> Path:
    return root / LATE_DIR / source_name


@dataclass(frozen=True, slots=True, order=True)
class PartName:
    """One archive part: part ``index`` of ``count`` written for one flush of one partition.

    A flush covers the records at offsets ``first..last`` of (topic, partition) and writes one
    part per directory it has rows for (a source's UTC days; the late marks of each source).
    It counts only when all ``count`` parts exist, so a kill between two renames is undone at
    the next start and the range read again.
    """

    topic: str
    partition: int
    first: int
    last: int
    index: int
    count: int

    def file_name(self) -> str:
        return (
            f"part-{self.topic}.p{self.partition}.o{self.first:012d}-{self.last:012d}"
            f".g{self.index}of{self.count}.parquet"
        )

    @property
    def flush(self) -> tuple[str, int, int, int, int]:
        """What the parts of one flush share."""
        return self.topic, self.partition, self.first, self.last, self.count

    def metadata(self, records: int) -> dict[bytes, bytes]:
        facts = {
            "topic": self.topic,
            "partition": self.partition,
            "first_offset": self.first,
            "last_offset": self.last,
            "part": self.index,
            "parts": self.count,
            "records": records,
        }
        return {PART_METADATA_KEY: orjson.dumps(facts)}


def parse_part_name(name: str) -> PartName | None:
    """The PartName of an archive part's file name; None for any other file."""
    match = _PART_NAME.match(name)
    if match is None:
        return None
    g = match.groupdict()
    return PartName(
        g["topic"],
        int(g["partition"]),
        int(g["first"]),
        int(g["last"]),
        int(g["index"]),
        int(g["count"]),
    )


def part_metadata(path: Path) -> dict[str, Any]:
    """The archive facts stored inside a part (its footer), e.g. to audit names against."""
    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(PART_METADATA_KEY)
    return dict(orjson.loads(raw)) if raw is not None else {}


def first_per_event(table: pa.Table) -> pa.Table:
    """Rows of an archive table with one row per ``_event_id``: the first by (topic,
    partition, offset). Keeps the rows' order."""
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(
        table, sort_keys=[(TOPIC, "ascending"), (PARTITION, "ascending"), (OFFSET, "ascending")]
    ).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    ranked = pa.table({EVENT_ID: table.column(EVENT_ID), "__rank": rank})
    firsts = ranked.group_by(EVENT_ID, use_threads=False).aggregate([("__rank", "min")])
    keep = np.sort(order[firsts.column("__rank_min").to_numpy()])
    if len(keep) == table.num_rows:
        return table
    return table.take(pa.array(keep))


def read_late_marks(root: Path, source_name: str, view: str | None = None) -> pa.Table:
    """The late marks of one source (of one view when given), in ``LATE_SCHEMA``."""
    parts = sorted(late_dir(root, source_name).glob("part-*.parquet"))
    if not parts:
        return LATE_SCHEMA.empty_table()
    marks = pa.concat_tables([pq.read_table(p, schema=LATE_SCHEMA) for p in parts])
    if view is not None:
        marks = marks.filter(pc.equal(marks.column("view"), view))
    return marks


def drop_marked(table: pa.Table, marks: pa.Table) -> pa.Table:
    """Archive rows whose (topic, partition, offset) has no mark. Keeps the rows' order."""
    if marks.num_rows == 0 or table.num_rows == 0:
        return table
    keys = marks.select(["topic", "partition", "offset"]).rename_columns([TOPIC, PARTITION, OFFSET])
    numbered = table.append_column("__row", pa.array(np.arange(table.num_rows)))
    kept = numbered.join(keys, keys=[TOPIC, PARTITION, OFFSET], join_type="left anti")
    rows = np.sort(kept.column("__row").to_numpy())
    return table.take(pa.array(rows))


_JSON_BLOCK = 4 << 20
_NOT_CANONICAL = (pa.ArrowException, ValueError)


def parse_events(source: EventSource, values: Sequence[bytes]) -> tuple[pa.Table, list[int]]:
    """Canonical JSON values as a table of the source's declared columns, and the indices of
    the values it holds (a value that is not canonical JSON of the source is left out)."""
    schema = arrow_schema(source)
    # Canonical events carry timestamps as epoch milliseconds: read as int64, then cast.
    json_schema = pa.schema(
        [
            pa.field(f.name, pa.int64(), f.nullable) if declared.type is FieldType.TIMESTAMP else f
            for f, declared in zip(schema, source.fields, strict=True)
        ]
    )
    options = pj.ParseOptions(explicit_schema=json_schema, unexpected_field_behavior="ignore")
    tables: list[pa.Table] = []
    kept: list[int] = []

    def read(lo: int, hi: int) -> None:
        chunk = values[lo:hi]
        try:
            data = b"\n".join(chunk)
            block = max(_JSON_BLOCK, max(len(v) for v in chunk) + 1)
            table = pj.read_json(
                io.BytesIO(data),
                read_options=pj.ReadOptions(block_size=block),
                parse_options=options,
            )
            if table.num_rows != len(chunk):
                raise ValueError("a value is not one JSON object on one line")
        except _NOT_CANONICAL:
            if hi - lo == 1:
                return
            middle = (lo + hi) // 2  # halve until the bad values are alone
            read(lo, middle)
            read(middle, hi)
            return
        tables.append(table)
        kept.extend(range(lo, hi))

    if values:
        read(0, len(values))
    if not tables:
        return schema.empty_table(), []
    table = pa.concat_tables(tables).combine_chunks()
    columns = [
        table.column(f.name).cast(f.type)
        if f.type != table.schema.field(f.name).type
        else table.column(f.name)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema), kept


# -- recovery: where the archive resumes ------------------------------------------------------


@dataclass
class Recovery:
    next_offsets: dict[tuple[str, int], int]
    parts: int  # complete parts found
    undone: list[Path]  # files deleted: dot-temp files and parts of incomplete flushes


def archive_dirs(root: Path) -> Iterator[Path]:
    """Every directory the archiver writes parts to."""
    yield from (d for d in root.glob("*/date=*") if d.is_dir())
    yield from (d for d in (root / LATE_DIR).glob("*") if d.is_dir())
    progress = root / ARCHIVE_DIR / PROGRESS_DIR
    if progress.is_dir():
        yield progress


def recover(root: Path, *, clean: bool = True) -> Recovery:
    """Where to resume each (topic, partition), from the parts under ``root``.

    With ``clean``, deletes what a kill left half done first: dot-temp files, and every part of
    a flush that has fewer parts than it announced. Raises ArchiveLayoutError when complete
    flushes of one partition overlap (the same offsets twice).
    """
    flushes: dict[tuple[str, int, int, int, int], dict[int, Path]] = {}
    undone: list[Path] = []
    for directory in archive_dirs(root):
        for entry in os.scandir(directory):
            name = entry.name
            if name.startswith(".") and name.endswith(".tmp"):
                if parse_part_name(name[1:-4]) is not None:
                    undone.append(Path(entry.path))
                continue
            part = parse_part_name(name)
            if part is None:
                continue
            held = flushes.setdefault(part.flush, {})
            if part.index in held:
                raise ArchiveLayoutError(
                    f"part {part.index} of one flush twice: {held[part.index]} and {entry.path}"
                )
            held[part.index] = Path(entry.path)
    ranges: dict[tuple[str, int], list[tuple[int, int, Path]]] = {}
    incomplete: list[tuple[str, int, int, list[Path]]] = []
    complete = 0
    for (topic, partition, first, last, count), held in flushes.items():
        if set(held) != set(range(1, count + 1)):
            incomplete.append((topic, partition, first, list(held.values())))
            continue
        complete += len(held)
        ranges.setdefault((topic, partition), []).append((first, last, held[1]))
    for topic, partition, first, paths in incomplete:
        # A kill leaves at most the newest flush of a partition incomplete; an older one lost
        # a part some other way, and deleting the rest would lose its range for good.
        later = [p for f, _, p in ranges.get((topic, partition), []) if f > first]
        if later:
            raise ArchiveLayoutError(
                f"{topic}[{partition}]: a part of the flush of {paths[0]} is missing but later "
                f"flushes exist ({later[0]}); restore it, or move this partition's parts away "
                "to archive it again"
            )
        undone.extend(paths)
    next_offsets = {}
    for key, spans in ranges.items():
        spans.sort()
        for (_, last, path), (first, _, other) in itertools.pairwise(spans):
            if first <= last:
                raise ArchiveLayoutError(
                    f"{key[0]}[{key[1]}]: offsets {first}..{last} are archived twice "
                    f"({path} and {other}); remove the copy that does not belong"
                )
        next_offsets[key] = max(last for _, last, _ in spans) + 1
    if clean:
        for path in undone:
            log.warning("undoing an incomplete flush", extra={"file": str(path)})
            path.unlink(missing_ok=True)
    return Recovery(next_offsets, complete, undone)
