"""`sluice backfill`: Spark over the event history into the offline and online stores."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cli.common import console, parse_day, settings


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
        parse_day(start),
        parse_day(end) if end else None,
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
