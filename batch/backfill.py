"""Backfills: compute views' windows from the parquet event history into the offline store.

``backfill(settings, views, start, end)`` writes every window ending in
``[start 00:00, end 00:00)`` UTC, replacing those date partitions (idempotent: a re-run
replaces, never duplicates). Windows at the start are complete: history is read from one
largest window plus one slide before the first end (the slide for the closing rows). The last
completed end per view goes to ``<offline_store_dir>/_backfill_state.json``; with
``incremental=True`` a run restarts at the UTC day of that point (a date partition is always
rewritten whole) and continues up to the newest window closed now, so cron can run it again and
again. Then, for online views, each entity's newest row is pushed to the online store.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from batch.compile import compile_view
from batch.errors import BackfillRangeError
from batch.history import read_events as read_events  # re-exported: bench, tests
from batch.history import source_schema as source_schema
from batch.offline_store import DAY_MS, load_state, read_offline, save_state, write_offline
from batch.session import spark_session
from core.settings import Settings
from features.contract import lateness_ms
from features.definitions import FeatureView

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

# Days of windows one Spark job computes. Each job re-reads one largest window of history
# before its first end, so a view's chunk is never shorter than that window: the re-read
# stays below half of what a chunk reads.
DEFAULT_CHUNK_DAYS = 7


@dataclass(frozen=True)
class BackfillStep:
    """One finished step (a view and a chunk of days), for progress reporting."""

    view: str
    start_ms: int
    end_ms: int
    events_read: int
    rows_written: int
    seconds: float


@dataclass
class ViewReport:
    view: str
    start_ms: int  # first window end computed (inclusive)
    end_ms: int  # window ends computed are < end_ms
    events_read: int = 0
    rows_written: int = 0
    materialized: int | None = None  # entities pushed online; None when not materialized
    steps: list[BackfillStep] = field(default_factory=list)


@dataclass
class BackfillReport:
    views: list[ViewReport]
    seconds: float

    @property
    def events_read(self) -> int:
        """History rows read, summed over views (a source read by two views counts twice)."""
        return sum(v.events_read for v in self.views)

    @property
    def rows_written(self) -> dict[str, int]:
        return {v.view: v.rows_written for v in self.views}

    @property
    def events_per_s(self) -> float:
        return self.events_read / self.seconds if self.seconds > 0 else 0.0


def backfill(
    settings: Settings,
    views: Sequence[FeatureView],
    start: date,
    end: date | None = None,
    *,
    incremental: bool = False,
    materialize: bool = True,
    spark: SparkSession | None = None,
    now: datetime | None = None,
    chunk_days: int = DEFAULT_CHUNK_DAYS,
    on_progress: Callable[[BackfillStep], None] | None = None,
    show_progress: bool = True,
) -> BackfillReport:
    """Compute and store ``views`` for windows ending in ``[start, end)`` (UTC midnights).

    ``incremental``: per view, from the UTC day of its recorded completed end (``start`` when
    none) up to the newest window closed at ``now``, capped at ``end`` when given. Raises
    BackfillRangeError for an empty range in the non-incremental mode.
    """
    began = time.perf_counter()
    now_ms = _ms(now or datetime.now(UTC))
    if chunk_days < 1:
        raise BackfillRangeError("chunk_days must be at least 1")
    check_range(start, end, incremental=incremental)
    spark = spark or spark_session(settings)
    state = load_state(settings)
    reports = [
        ViewReport(view.name, *_view_range(view, start, end, incremental, state, now_ms))
        for view in views
    ]
    plan = [
        (view, report, chunk)
        for view, report in zip(views, reports, strict=True)
        for chunk in view_chunks(view, report.start_ms, report.end_ms, chunk_days)
    ]
    with _progress(len(plan), show_progress) as advance:
        for view, report, (lo, hi) in plan:
            step = _run_chunk(spark, settings, view, lo, hi)
            report.steps.append(step)
            report.events_read += step.events_read
            report.rows_written += step.rows_written
            _record(settings, view, report.start_ms, min(hi, _closed_bound(view, now_ms)))
            advance(step)
            if on_progress is not None:
                on_progress(step)
    if materialize:
        for view, report in zip(views, reports, strict=True):
            if view.online and report.end_ms > report.start_ms:
                as_of = min(report.end_ms - 1, now_ms)
                report.materialized = materialize_view(
                    spark, settings, view, report.start_ms, as_of
                )
    return BackfillReport(reports, time.perf_counter() - began)


def check_range(start: date, end: date | None, *, incremental: bool) -> None:
    """Raise BackfillRangeError unless [start, end) names at least one day (or, incremental,
    end is absent or after start). The CLI calls it before Spark starts."""
    if end is None:
        if not incremental:
            raise BackfillRangeError(
                f"no end day: give --end (the day after the last, exclusive) after --start "
                f"{start}, or --incremental"
            )
        return
    if end <= start:
        raise BackfillRangeError(
            f"empty range: --end {end} is not after --start {start} (end is exclusive: "
            f"--start {start} --end {start + timedelta(days=1)} is one day)"
        )


def _view_range(
    view: FeatureView,
    start: date,
    end: date | None,
    incremental: bool,
    state: dict[str, int],
    now_ms: int,
) -> tuple[int, int]:
    """[first end, stop) in epoch ms of the window ends to compute for one view."""
    if not incremental:
        assert end is not None
        return _midnight_ms(start), _midnight_ms(end)
    done = state.get(view.name)
    lo = done - done % DAY_MS if done is not None else _midnight_ms(start)
    hi = _closed_bound(view, now_ms)
    if end is not None:
        hi = min(hi, _midnight_ms(end))
    return lo, max(lo, hi)


def _closed_bound(view: FeatureView, now_ms: int) -> int:
    """Exclusive bound of the window ends closed at ``now``: ends <= now."""
    slide = view.slide_ms
    return (now_ms // slide + 1) * slide


def view_chunks(view: FeatureView, lo: int, hi: int, chunk_days: int) -> Iterator[tuple[int, int]]:
    """[lo, hi) cut at UTC midnights into one Spark job's worth of window ends each."""
    days = max(chunk_days, math.ceil(view.max_window.size_ms / DAY_MS))
    step = days * DAY_MS
    first = lo - lo % DAY_MS
    for chunk_lo in range(first, hi, step):
        yield max(lo, chunk_lo), min(hi, chunk_lo + step)


def _run_chunk(
    spark: SparkSession, settings: Settings, view: FeatureView, lo: int, hi: int
) -> BackfillStep:
    began = time.perf_counter()
    # Windows ending at lo need events from lo - size; the closing row at lo needs to know
    # about events one slide before that.
    events, events_read = read_events(
        spark,
        settings.history_dir,
        view.source,
        lo - view.max_window.size_ms - view.slide_ms,
        hi,
        view=view.name,  # less the events the stream dead-lettered as late for this view
    )
    rows = compile_view(spark, view, events, end_range=(lo, hi))
    days = [_day(ms) for ms in range(lo - lo % DAY_MS, hi, DAY_MS)]
    written = write_offline(settings, view, rows, days)
    return BackfillStep(view.name, lo, hi, events_read, written, time.perf_counter() - began)


def _record(settings: Settings, view: FeatureView, range_start: int, completed: int) -> None:
    """Advance the view's completed end, unless this range left a gap after the old one."""
    if completed <= range_start:
        return  # nothing closed yet in this range
    state = load_state(settings)
    previous = state.get(view.name)
    if previous is None or range_start <= previous:
        state[view.name] = completed if previous is None else max(previous, completed)
        save_state(settings, state)


def materialize_view(
    spark: SparkSession, settings: Settings, view: FeatureView, since_ms: int, as_of_ms: int
) -> int:
    """Push each entity's newest row with window end in ``[since_ms, as_of_ms]`` that is servable
    at as_of (end + lateness <= as_of: its value at as_of under the availability contract;
    closing rows included, so emptied windows overwrite stale values) to the online store.
    Returns the number of entities written."""
    from pyspark.sql import functions as sf

    from feature_repo.online_store import OnlineRow, open_online_store  # loaded on use

    key = view.entity.join_key
    names = [spec.name for spec in view.features()]
    since = datetime.fromtimestamp(since_ms / 1000, UTC)
    until = datetime.fromtimestamp((as_of_ms - lateness_ms(view) + 1) / 1000, UTC)
    latest = (
        read_offline(spark, settings, view, since, until)
        .groupBy(key)
        .agg(
            sf.max_by(
                sf.struct(sf.unix_millis(sf.col("event_timestamp")).alias("__end"), *names),
                "event_timestamp",
            ).alias("row")
        )
    )
    rows = []
    for record in latest.toLocalIterator():
        row: dict[str, Any] = record["row"].asDict()
        end = int(row.pop("__end"))
        rows.append(OnlineRow(entity_key=record[key], window_end_ms=end, values=row))
    with open_online_store(settings) as store:
        store.write(view, rows)
    return len(rows)


@contextmanager
def _progress(total: int, show: bool) -> Iterator[Callable[[BackfillStep], None]]:
    """A rich progress bar with one step per view x chunk (or a no-op)."""
    if not show:
        yield lambda step: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("backfill", total=total)

        def advance(step: BackfillStep) -> None:
            progress.update(
                task, advance=1, description=f"backfill {step.view} {_day(step.start_ms)}"
            )

        yield advance


def _midnight_ms(day: date) -> int:
    return _ms(datetime.combine(day, datetime.min.time(), UTC))


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _day(ms: int) -> date:
    return datetime.fromtimestamp(ms / 1000, UTC).date()
