"""`sluice produce | ingest`: events into Kafka, validated, with dead letters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import console, parse_time, progress_bar, settings
from core.errors import ExitCode
from events.ingest import IngestCounts


def produce(
    events: Annotated[int, typer.Option(min=1, help="How many events to generate.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same events.")] = 7,
    rate: Annotated[
        float | None,
        typer.Option(min=0.1, help="Live mode: events/s, event time = now. Default: max speed."),
    ] = None,
    start: Annotated[
        str | None,
        typer.Option(help="Simulated start (ISO, UTC if no zone). Default: yesterday 00:00."),
    ] = None,
    corrupt_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of events published malformed.")
    ] = 0.0,
    history: Annotated[
        Path | None, typer.Option(help="Also write the events to this parquet history folder.")
    ] = None,
    kafka: Annotated[bool, typer.Option(help="Publish to the raw topics.")] = True,
) -> None:
    """Generate synthetic food-delivery traffic (orders, courier pings, deliveries)."""
    from examples.delivery.produce import produce_synthetic

    if rate and start:
        raise typer.BadParameter("--start and --rate exclude each other (live runs start now)")
    with progress_bar(events, "producing") as progress:
        task = progress.add_task("produce", total=events)
        report = produce_synthetic(
            settings(),
            events,
            seed=seed,
            rate=rate,
            start_ms=parse_time(start) if start else None,
            corrupt_fraction=corrupt_fraction,
            to_kafka=kafka,
            history_dir=history,
            on_progress=lambda n: progress.update(task, completed=n),
        )
    table = Table("source", "events", "history rows")
    for name, count in sorted(report.by_source.items()):
        table.add_row(name, str(count), str(report.history_rows.get(name, "-")))
    console.print(table)
    span = (report.last_event_ms - report.first_event_ms) / 60_000
    console.print(
        f"produced {report.events} events ({report.corrupted} malformed on purpose) in "
        f"{report.seconds:.2f} s: {report.rate:,.0f} events/s; simulated span {span:.1f} min"
    )


def ingest(
    idle_timeout: Annotated[
        float, typer.Option(help="Stop after this many seconds without a new record.")
    ] = 5.0,
    max_events: Annotated[int | None, typer.Option(help="Stop after this many records.")] = None,
    group: Annotated[str, typer.Option(help="Consumer group (offsets resume).")] = "sluice-ingest",
) -> None:
    """Validate raw events: valid ones to the event topics, the rest to the dead-letter topic."""
    from events.ingest import run_ingest
    from examples.delivery.sources import SOURCES

    with progress_bar(None, "ingesting") as progress:
        task = progress.add_task("ingest", total=None)
        counts = run_ingest(
            settings(),
            SOURCES,
            group_id=group,
            idle_timeout_s=idle_timeout,
            max_events=max_events,
            on_progress=lambda c: progress.update(task, completed=c.received),
        )
    print_ingest_counts(counts)
    if not counts.balanced():
        raise typer.Exit(int(ExitCode.UNBALANCED))


def print_ingest_counts(counts: IngestCounts) -> None:
    table = Table("outcome", "records")
    table.add_row("received", str(counts.received))
    table.add_row("valid", str(counts.valid))
    table.add_row("dead-lettered", str(counts.dead_lettered))
    for reason, n in sorted(counts.by_reason.items()):
        table.add_row(f"  reason {reason}", str(n))
    console.print(table)
    verdict = "balanced" if counts.balanced() else "NOT BALANCED"
    console.print(
        f"{counts.received} in = {counts.valid} valid + {counts.dead_lettered} dead-lettered "
        f"({verdict})"
    )
