"""`sluice monitor`: drift, freshness, live error and skew from the prediction log."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from cli.common import console, parse_time, require_broker, settings

if TYPE_CHECKING:
    from monitoring.records import MonitorRecord
    from monitoring.runner import MonitorSummary


def monitor(
    until: Annotated[
        str | None,
        typer.Option(
            help="Bounded run: stop once every topic's records reach this time (ISO, UTC); "
            "report every period before it. Default: run until Ctrl-C."
        ),
    ] = None,
    idle_timeout: Annotated[
        float | None,
        typer.Option(min=0.5, help="Bounded run: stop after this many seconds without a record."),
    ] = None,
    serve: Annotated[
        bool, typer.Option("--serve", help="Serve the dashboard while the monitor runs.")
    ] = False,
    host: Annotated[str | None, typer.Option(help="Dashboard address (default: setting).")] = None,
    port: Annotated[int | None, typer.Option(help="Dashboard port (default: setting).")] = None,
    period: Annotated[
        float | None, typer.Option(min=0.5, help="Seconds per period (default: setting).")
    ] = None,
    predictor_url: Annotated[
        str | None,
        typer.Option(help="The predictor's base URL, to read its cache hit rate from /metrics."),
    ] = None,
) -> None:
    """Watch the prediction log: drift, freshness, live MAE and skew per period; alerts."""
    from monitoring.dashboard import DashboardServer
    from monitoring.metrics import MonitorMetrics
    from monitoring.runner import run_monitor
    from monitoring.state import MonitorState

    s = settings()
    if period is not None:
        s = s.model_copy(update={"monitor_period_s": period})
    bounded = parse_time(until, "--until") if until else None
    require_broker(s)
    state = MonitorState(s.monitor_period_s)
    metrics = MonitorMetrics()
    server = None
    if serve:
        server = DashboardServer(state, metrics, host or s.monitor_host, port or s.monitor_port)
        server.start()
        console.print(f"dashboard: {server.url}", highlight=False)
    try:
        summary = run_monitor(
            s,
            until_ms=bounded,
            idle_timeout_s=idle_timeout,
            state=state,
            metrics=metrics,
            predictor_url=predictor_url,
            echo=lambda text: console.print(text, highlight=False),
        )
    finally:
        if server is not None:
            server.stop()
    print_summary(console, summary)


def _subject(record: MonitorRecord) -> str:
    """Model and version on one line, the view or feature on the next."""
    model = " ".join(
        p
        for p in (
            record.model,
            None if record.model_version is None else f"v{record.model_version}",
        )
        if p
    )
    return "\n".join(p for p in (model, record.view or record.feature) if p)


def _number(value: object, percent: bool = False) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{value:.1%}" if percent else f"{value:.3g}"


def _headline(record: MonitorRecord) -> str:
    v = record.values
    check = record.check
    if check in ("drift", "prediction_drift"):
        if "psi" not in v:
            return f"no reference ({v.get('reference', '?')})"
        return f"psi {_number(v.get('psi'))} ks {_number(v.get('ks_statistic'))}"
    if check == "serving":
        return (
            f"{_number(v.get('throughput_rps'))}/s p99 {_number(v.get('latency_p99_ms'))} ms "
            f"batch {_number(v.get('batch_mean'))}"
        )
    if check == "freshness":
        return (
            f"behind {_number(v.get('behind_rate'), True)}, no row "
            f"{_number(v.get('missing_rate'), True)}, age p95 {_number(v.get('age_p95_s'))} s"
        )
    if check == "stream_freshness":
        late, delay = _number(v.get("late_rate"), True), _number(v.get("delay_p95_s"))
        return f"late {late} delay p95 {delay} s"
    if check == "live_error":
        return f"mae {_number(v.get('mae'))} (training {_number(v.get('training_mae'))})"
    if check == "skew":
        if "error" in v:
            return f"failed: {str(v['error'])[:40]}"
        return (
            f"mismatch {_number(v.get('mismatch_rate'), True)} of {v.get('compared_rows')}, "
            f"{len(record.items)} entities"
        )
    return ""


def print_summary(console: Console, summary: MonitorSummary) -> None:
    """The newest period of every check, live MAE per version, alerts; fits 80 columns."""
    table = Table(
        title="monitor: newest period per check", title_justify="left", box=box.SIMPLE_HEAD
    )
    table.add_column("check", no_wrap=True)
    table.add_column("subject", overflow="fold", min_width=25)
    table.add_column("band: result", overflow="fold")
    calm: dict[str, int] = {}
    for record in sorted(summary.latest, key=lambda r: (r.check, _subject(r))):
        quiet = record.check == "drift" and record.band == "none"
        if quiet:  # features without drift: counted, not listed
            key = f"{record.model} v{record.model_version}"
            calm[key] = calm.get(key, 0) + 1
            continue
        band = record.band
        style = {"drift": "red", "possible": "yellow"}.get(band or "", "")
        shown = f"[{style}]{band}[/{style}]: " if style else f"{band}: " if band else ""
        table.add_row(record.check, _subject(record), shown + _headline(record))
    for version, count in sorted(calm.items()):
        table.add_row("drift", version, f"none: {count} features")
    console.print(table)
    if summary.mae:
        mae = Table(title="live error, whole run", title_justify="left")
        for column in ("model", "version", "labels", "MAE"):
            mae.add_column(column, justify="right" if column != "model" else "left")
        for (name, number), totals in sorted(summary.mae.items()):
            mae.add_row(name, str(number), str(totals.labels), _number(totals.mae))
        console.print(mae)
    read = ", ".join(f"{kind} {n}" for kind, n in sorted(summary.consumed.items()))
    console.print(f"read: {read or 'nothing'}", highlight=False)
    late = sum(summary.late.values())
    invalid = sum(summary.invalid.values())
    console.print(
        f"{summary.written} results, {len(summary.alerts)} alerts, {late} late records, "
        f"{invalid} invalid records",
        highlight=False,
    )
    for alert in summary.alerts[-10:]:
        console.print(f"[red]alert[/red] {alert.message}", highlight=False)
    for subject, note in sorted(summary.notes.items()):
        console.print(f"note: {subject}: {note}", highlight=False)
    if summary.skew_unfinished:
        console.print(f"{summary.skew_unfinished} skew samples not recomputed in time")
    if summary.interrupted:
        console.print("stopped; open periods are read again by the next run", highlight=False)
