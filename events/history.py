"""Event history as parquet: the offline copy of the event streams that Spark and Feast read.

Layout: ``root/<source>/date=YYYY-MM-DD/part-NNNNN.parquet``, hive-style partitions by the UTC
date of the event time, one typed column per declared field (no partition column inside the
files; engines add ``date`` from the path). Writing is idempotent per partition: a date that a
call writes is replaced as a whole, so re-running a backfill for a day never duplicates rows.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from features.schema import EventSource, FieldType

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
            shutil.rmtree(directory)  # first write of this date in this call: replace the day
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


def read_history(root: Path, source: EventSource) -> pa.Table:
    """All history of one source, ordered by date then part; declared columns only."""
    schema = arrow_schema(source)
    parts = sorted((root / source.name).glob("date=*/part-*.parquet"))
    if not parts:
        return schema.empty_table()
    return pa.concat_tables([pq.read_table(part, schema=schema) for part in parts])
