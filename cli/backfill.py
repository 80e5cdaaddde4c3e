"""`sluice backfill`: Spark over the event history into the offline and online stores."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cli.common import console, parse_day, require_redis, settings, unknown_views


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
    from batch.backfill import check_range
    from batch.errors import HistoryMissingError
    from cli.features import load_definitions  # user code failing at import: exit 5

    first = parse_day(start, "--start")
    last = parse_day(end, "--end") if end else None
    check_range(first, last, incremental=incremental)
    s = settings()
    registry = load_definitions(s.definitions_module)
    views = list(registry.views.values())
    if view:
        unknown_views(view, registry.views)
        views = [registry.views[name] for name in view]
    if not s.history_dir.is_dir():
        raise HistoryMissingError(
            f"no event history at {s.history_dir} (SLUICE_HISTORY_DIR): write it with "
            "`sluice produce --history DIR` or `sluice archive`, or point the setting at it"
        )
    if materialize and any(v.online for v in views):
        require_redis(s)  # before Spark starts, not after it has computed everything
    report = run_backfill(
        s,
        views,
        first,
        last,
        incremental=incremental,
        materialize=materialize,
        show_progress=console.is_terminal,
    )
    table = Table()
    table.add_column("view", no_wrap=True)
    for header in ("events read", "offline rows", "online entities"):
        table.add_column(header, justify="right")
    for row in report.views:
        online = "-" if row.materialized is None else str(row.materialized)
        table.add_row(row.view, str(row.events_read), str(row.rows_written), online)
    console.print(table)
    console.print(
        f"backfill took {report.seconds:.1f} s ({report.events_per_s:,.0f} events read/s); "
        f"offline store: {s.offline_store_dir}"
    )
