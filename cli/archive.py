"""`sluice archive`: the events topics into the parquet history, exactly once (events/archive.py).

Runs until Ctrl-C or SIGTERM (or --idle-timeout seconds without a record, or --max-events):
then flushes everything it read and exits 0. A kill -9 loses nothing either: the next run
resumes from the offsets stored with the parts.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Annotated

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.common import console, settings
from core.errors import ExitCode
from events.archive import ArchiveCounts


@contextmanager
def _stop_on_signals() -> Iterator[list[bool]]:
    """A flag that SIGINT and SIGTERM set (instead of raising), for a flush before exiting.

    A second signal acts as it did before (Ctrl-C twice: stop at once; nothing is lost, the
    next run resumes from the parts on disk)."""
    stop = [False]

    def handler(signum: int, _frame: FrameType | None) -> None:
        stop[0] = True
        signal.signal(signum, previous[signal.Signals(signum)])

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _describe(counts: ArchiveCounts, started: float) -> str:
    rate = counts.consumed / max(time.monotonic() - started, 1e-9)
    return (
        f"archiving: {counts.consumed:,} read ({rate:,.0f}/s), {counts.archived:,} archived, "
        f"{counts.late_marks:,} late marks, {counts.skipped:,} skipped, "
        f"{counts.buffered:,} buffered, {counts.parts:,} parts"
    )


def archive(
    idle_timeout: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            help="Stop after this many seconds without a record. Default: run "
            "until Ctrl-C or SIGTERM.",
        ),
    ] = None,
    flush_records: Annotated[
        int, typer.Option(min=1, help="Flush a partition's parts after this many records.")
    ] = 10_000,
    flush_seconds: Annotated[
        float,
        typer.Option(min=0.1, help="Flush a partition's parts when its oldest record is this old."),
    ] = 5.0,
    max_events: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many records.")
    ] = None,
) -> None:
    """Archive the events topics and late dead letters into the parquet history, exactly once."""
    from events.archive import run_archive
    from features.registry import load_registry

    config = settings()
    sources = list(load_registry(config.definitions_module).sources.values())
    console.print(
        f"archive {', '.join(s.topic for s in sources)} and {config.dead_letter_topic} "
        f"into {config.history_dir}; Ctrl-C flushes and stops"
    )
    started = time.monotonic()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with (
        _stop_on_signals() as stop,
        Progress(*columns, console=console, disable=not console.is_terminal) as progress,
    ):
        task = progress.add_task("archiving", total=None)
        counts = run_archive(
            config,
            sources,
            flush_records=flush_records,
            flush_seconds=flush_seconds,
            idle_timeout_s=idle_timeout,
            max_events=max_events,
            on_progress=lambda c: progress.update(task, description=_describe(c, started)),
            should_stop=lambda: stop[0],
        )
    print_archive_counts(counts)
    if not counts.balanced():
        raise typer.Exit(int(ExitCode.UNBALANCED))


def print_archive_counts(counts: ArchiveCounts) -> None:
    table = Table("outcome", "records")
    table.add_row("consumed", str(counts.consumed))
    table.add_row("archived", str(counts.archived))
    for source, n in sorted(counts.by_source.items()):
        table.add_row(f"  {source}", str(n))
    table.add_row("late marks", str(counts.late_marks))
    table.add_row("skipped", str(counts.skipped))
    for reason, n in sorted(counts.skipped_by_reason.items()):
        table.add_row(f"  reason {reason}", str(n))
    console.print(table)
    verdict = "balanced" if counts.balanced() else "NOT BALANCED"
    rate = counts.consumed / counts.busy_seconds if counts.busy_seconds > 0 else 0.0
    console.print(
        f"{counts.consumed} consumed = {counts.archived} archived + {counts.late_marks} late "
        f"marks + {counts.skipped} skipped ({verdict}); {counts.parts} parts, "
        f"{rate:,.0f} records/s; resumed {counts.resumed_partitions} partitions"
        + (
            f", undid {counts.undone_parts} parts of an interrupted flush"
            if counts.undone_parts
            else ""
        )
    )
