"""`sluice`: one command line for the stack, events, features and engines.

Heavy engines (Spark, Flink, Feast) are imported inside the commands that need them, so that
`sluice --help` answers at once.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.features import features_app
from cli.stream import (
    FreshOption,
    ReportOption,
    UntilOption,
    ViewOption,
    stream_command,
)
from core.errors import SluiceError
from core.logs import configure_logging
from core.settings import Settings, load_settings
from events.ingest import IngestCounts
from infra.stack import ComponentStatus

app = typer.Typer(
    help="Sluice: define features once, compute them with Spark and Flink, serve them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(features_app, name="features")
console = Console()
_state: dict[str, Settings] = {}


def settings() -> Settings:
    return _state["settings"]


@app.callback()
def _main(
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML settings file (else SLUICE_CONFIG).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="Structured log level on stderr.")] = "WARNING",
) -> None:
    configure_logging(log_level)
    _state["settings"] = load_settings(config)


def _stack_table(rows: list[ComponentStatus]) -> Table:
    table = Table("component", "state", "address", "pid", "uptime", "log")
    for row in rows:
        table.add_row(
            row.name,
            row.state,
            row.address,
            str(row.pid or "-"),
            f"{row.uptime_s:.0f} s" if row.uptime_s is not None else "-",
            str(row.log_path or "-"),
        )
    return table


@app.command()
def up() -> None:
    """Start the local broker and Redis on loopback (idempotent); wait until both answer."""
    from infra.stack import stack_up

    console.print(_stack_table(stack_up(settings())))


@app.command()
def down() -> None:
    """Stop the broker and Redis that `sluice up` started (only their recorded pids)."""
    from infra.stack import stack_down

    stopped = [c.name for c in stack_down(settings())]
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@app.command()
def status() -> None:
    """Show what runs, where, and the topics on the broker."""
    from core.kafka import topic_summary
    from infra.stack import stack_status

    console.print(_stack_table(stack_status(settings())))
    topics = topic_summary(settings())
    if topics is None:
        console.print("broker: not answering")
        return
    table = Table("topic", "partitions", "records (approx.)")
    for name, partitions, records in topics:
        table.add_row(name, str(partitions), str(records))
    console.print(table)


def _progress(total: int | None, label: str) -> Progress:
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


def _parse_time(value: str) -> int:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO date or date-time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


@app.command()
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
    with _progress(events, "producing") as progress:
        task = progress.add_task("produce", total=events)
        report = produce_synthetic(
            settings(),
            events,
            seed=seed,
            rate=rate,
            start_ms=_parse_time(start) if start else None,
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


@app.command()
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

    with _progress(None, "ingesting") as progress:
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
        raise typer.Exit(5)


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


def _parse_day(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date (YYYY-MM-DD)") from None


@app.command()
def backfill(
    start: Annotated[str, typer.Option(help="First day of window ends (YYYY-MM-DD, UTC).")],
    end: Annotated[
        str | None,
        typer.Option(help="Day after the last (exclusive). Required unless --incremental."),
    ] = None,
    incremental: Annotated[
        bool, typer.Option(help="Continue from the last completed window up to now (for cron).")
    ] = False,
    view: Annotated[
        list[str] | None, typer.Option("--view", help="Only these views (repeatable).")
    ] = None,
    materialize: Annotated[
        bool, typer.Option(help="Push the latest values to the online store (Redis).")
    ] = True,
) -> None:
    """Compute feature views over event history with Spark; idempotent per day partition."""
    from batch.backfill import backfill as run_backfill
    from features.registry import load_registry

    registry = load_registry(settings().definitions_module)
    views = list(registry.views.values())
    if view:
        unknown = sorted(set(view) - set(registry.views))
        if unknown:
            raise typer.BadParameter(f"unknown view(s): {', '.join(unknown)}")
        views = [registry.views[name] for name in view]
    report = run_backfill(
        settings(),
        views,
        _parse_day(start),
        _parse_day(end) if end else None,
        incremental=incremental,
        materialize=materialize,
        show_progress=console.is_terminal,
    )
    table = Table("view", "events read", "offline rows", "online entities")
    for row in report.views:
        online = "-" if row.materialized is None else str(row.materialized)
        table.add_row(row.view, str(row.events_read), str(row.rows_written), online)
    console.print(table)
    console.print(
        f"backfill took {report.seconds:.1f} s ({report.events_per_s:,.0f} events read/s); "
        f"offline store: {settings().offline_store_dir}"
    )


@app.command()
def stream(
    view: ViewOption = None,
    until: UntilOption = None,
    fresh: FreshOption = False,
    report_every: ReportOption = 10.0,
) -> None:
    """Run the Flink job of the stream views: Kafka events to Redis and features.<view>."""
    bounded = _parse_time(until) if until else None
    stream_command(settings(), console, view, bounded, fresh, report_every)


@app.command()
def train(
    service: Annotated[
        list[str] | None,
        typer.Option("--service", help="Feature services to train (repeatable). Default: both."),
    ] = None,
    eval_fraction: Annotated[
        float, typer.Option(min=0.01, max=0.9, help="Newest share of label times to evaluate on.")
    ] = 0.2,
    rounds: Annotated[int, typer.Option(min=1, help="LightGBM boosting rounds.")] = 200,
    promote: Annotated[
        bool | None,
        typer.Option(
            "--promote/--no-promote",
            help="Make the new versions production. Default: only where none is.",
        ),
    ] = None,
) -> None:
    """Train LightGBM models on point-in-time training sets; store them in the model registry."""
    from batch.train import DEFAULT_SERVICES, print_train_report, train_models

    report = train_models(
        settings(),
        service or DEFAULT_SERVICES,
        eval_fraction=eval_fraction,
        rounds=rounds,
        promote=promote,
    )
    print_train_report(console, report, settings().models_dir)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: setting).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: setting).")] = None,
) -> None:
    """Run the predictor (FastAPI on uvicorn): /predict, /feedback, /models, /metrics, /docs."""
    import uvicorn

    from models.errors import ModelNotFoundError
    from models.registry import ModelRegistry
    from serving.app import create_app

    s = settings()
    models = ModelRegistry(s.models_dir)
    for name in s.serve_models:  # fail here with one clear line, not in uvicorn's startup
        if models.production(name) is None:
            raise ModelNotFoundError(
                f"model {name!r} has no production version in {s.models_dir}: run `sluice train`"
            )
    uvicorn.run(
        create_app(s),
        host=host or s.serve_host,
        port=port or s.serve_port,
        log_level="warning",
        access_log=False,
    )


@app.command()
def demo(
    events: Annotated[int, typer.Option(min=1, help="Events to generate.")] = 20_000,
    keep_up: Annotated[bool, typer.Option(help="Leave the stack running afterwards.")] = False,
) -> None:
    """Run the pipeline end to end on the local stack and say what happened."""
    from examples.delivery.demo import run_demo

    run_demo(settings(), console, events=events, keep_up=keep_up)


def main() -> None:
    try:
        app()
    except SluiceError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False)
        raise SystemExit(int(exc.exit_code)) from None
