"""`sluice produce | ingest`: events into Kafka, validated, with dead letters.

Both follow the domain (settings.definitions_module): `ingest` validates the sources its
definitions declare, and `produce` calls the domain's ``produce`` hook, a callable of that module
taking the options below (see examples/delivery/features.py). A domain without one publishes
its own JSON to ``raw.<source>``; `sluice produce` then says so and exits NOT_FOUND.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, Protocol

import typer
from rich.console import Console
from rich.table import Table

from cli.common import console, parse_time, progress_bar, settings
from core.errors import ExitCode
from events.ingest import IngestCounts


class ProduceReport(Protocol):
    """What a domain's ``produce`` hook answers (examples/delivery/produce.py's report)."""

    events: int
    corrupted: int
    by_source: Counter[str]
    history_rows: dict[str, int]
    seconds: float
    first_event_ms: int
    last_event_ms: int

    @property
    def rate(self) -> float: ...


def require_hook(name: str, purpose: str) -> Callable[..., Any]:
    """The definitions module's hook ``name``; else one line saying what is missing, and exit."""
    from features.registry import domain_hook

    module = settings().definitions_module
    hook = domain_hook(module, name)
    if hook is None:
        fail(
            f"the domain {module} defines no `{name}` hook ({purpose}); add a function "
            f"`{name}` to it, or set SLUICE_DEFINITIONS_MODULE to a domain that has one",
            ExitCode.NOT_FOUND,
        )
    return hook


def fail(message: str, code: ExitCode) -> NoReturn:
    """One line on stderr and the exit code, like cli.main does for a SluiceError."""
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(int(code))


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
    """Generate synthetic events of the domain (its `produce` hook) to the raw topics."""
    if rate and start:
        raise typer.BadParameter("--start and --rate exclude each other (live runs start now)")
    produce_events = require_hook("produce", "synthetic events for `sluice produce`")
    with progress_bar(events, "producing") as progress:
        task = progress.add_task("produce", total=events)
        report: ProduceReport = produce_events(
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
    """Validate raw events of the domain's sources: valid ones to the event topics, the rest to
    the dead-letter topic."""
    from events.ingest import run_ingest
    from features.registry import load_registry

    sources = list(load_registry(settings().definitions_module).sources.values())
    if not sources:
        fail(f"{settings().definitions_module} declares no event sources", ExitCode.NOT_FOUND)
    with progress_bar(None, "ingesting") as progress:
        task = progress.add_task("ingest", total=None)
        counts = run_ingest(
            settings(),
            sources,
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
