"""`sluice stream`: the Flink job of the stream views, on a local mini-cluster or a cluster."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli.common import (
    console,
    parse_time,
    require_broker,
    require_redis,
    settings,
    unknown_views,
)
from core.errors import ExitCode
from core.settings import Settings


def stream_command(
    settings: Settings,
    console: Console,
    view: list[str] | None,
    until: int | None,
    fresh: bool,
    report_every: float,
) -> None:
    """Compile the views, run the job until Ctrl-C (or the end of a bounded run), report."""
    import streaming
    from cli.features import load_definitions  # user code failing at import: exit 5
    from streaming.job import JobOptions
    from streaming.runner import run as run_stream

    registry = load_definitions(settings.definitions_module)
    views = streaming.stream_views(registry.views.values())
    if view:
        unknown_views(view, registry.views)
        # A named batch view is compiled too, so that it fails with the reason it cannot run.
        views = [registry.views[name] for name in view]
    # Fail in a second, not after a JVM started: the job reads Kafka and writes Redis.
    require_broker(settings)
    require_redis(settings)
    options = JobOptions(
        parallelism=settings.flink_parallelism,
        checkpoint_interval_s=settings.flink_checkpoint_interval_s,
        jobmanager=settings.flink_jobmanager,
    )
    where = settings.flink_jobmanager or "a local mini-cluster"
    console.print(
        f"stream views {', '.join(v.name for v in views)} on {where}; Ctrl-C stops with a savepoint"
    )
    report = run_stream(
        settings,
        views,
        bounded_until_ms=until,
        options=options,
        restore=not fresh,
        report_every_s=report_every,
        echo=console.print,
    )
    table = Table()
    table.add_column("view", no_wrap=True)
    for header in ("events", "aggregated", "filtered", "late", "rejected", "rows", "lag"):
        table.add_column(header, justify="right")
    for name, v in report.views.items():
        table.add_row(
            name,
            *(str(n) for n in (v.events, v.aggregated, v.filtered, v.late, v.rejected, v.rows)),
            "?" if v.lag is None else str(v.lag),
        )
        if v.restored and any(v.restored.values()):
            # The tile engine carries its counters in the job's state: the job's totals over
            # every run (what this run restored + its own). Rows written are not carried.
            t = v.cumulative()
            totals = (t.events, t.aggregated, t.filtered, t.late, t.rejected)
            table.add_row(f"{name} (all runs)", *(str(n) for n in totals), "", "")
    console.print(table)
    if report.savepoint:
        console.print(f"savepoint: {report.savepoint} (the next `sluice stream` resumes there)")
    if not report.balanced() or not all(v.cumulative().balanced() for v in report.views.values()):
        console.print("[red]counts do not balance: events != aggregated + filtered + dead[/red]")
        raise typer.Exit(int(ExitCode.UNBALANCED))


ViewOption = Annotated[
    list[str] | None, typer.Option("--view", help="Only these views (repeatable).")
]
UntilOption = Annotated[
    str | None,
    typer.Option(
        help="Bounded run: read each partition up to this event time (ISO, UTC), emit every "
        "window and stop. Default: run until Ctrl-C."
    ),
]
FreshOption = Annotated[
    bool, typer.Option(help="Ignore the last checkpoint/savepoint; read from the earliest offset.")
]
ReportOption = Annotated[
    float, typer.Option(min=0.5, help="Seconds between throughput and lag lines.")
]


def stream(
    view: ViewOption = None,
    until: UntilOption = None,
    fresh: FreshOption = False,
    report_every: ReportOption = 10.0,
) -> None:
    """Run the Flink job of the stream views: Kafka events to Redis and features.<view>."""
    bounded = parse_time(until, "--until") if until else None
    stream_command(settings(), console, view, bounded, fresh, report_every)
