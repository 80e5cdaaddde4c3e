"""`sluice up [--cluster] | down | status`: the local stack, and the cluster beside it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from cli.common import console, settings
from core.errors import StackError
from infra.stack import ComponentStatus

if TYPE_CHECKING:
    from infra.cluster import ClusterStatus


def _stack_table(rows: list[ComponentStatus]) -> Table:
    # Names, states, addresses and pids never wrap; the log path folds (it stays whole).
    table = Table()
    table.add_column("component", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("address", no_wrap=True)
    table.add_column("pid", no_wrap=True, justify="right")
    table.add_column("uptime", no_wrap=True, justify="right")
    table.add_column("log", overflow="fold", min_width=12)
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


def _cluster_table(rows: list[ClusterStatus]) -> Table:
    table = Table(title="cluster")
    table.add_column("component", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("pid", no_wrap=True, justify="right")
    table.add_column("web UI / endpoint", overflow="fold")
    table.add_column("detail", overflow="fold")
    for row in rows:
        c = row.component
        table.add_row(c.name, c.state, str(c.pid or "-"), row.web_ui, row.detail or "-")
    return table


def up(
    cluster: Annotated[
        bool,
        typer.Option(
            "--cluster",
            help="Also start a Flink session cluster, a Spark standalone master and worker and "
            "an S3-compatible object store on loopback.",
        ),
    ] = False,
) -> None:
    """Start the local broker and Redis on loopback (idempotent); wait until both answer."""
    from infra.stack import stack_up

    console.print(_stack_table(stack_up(settings())))
    if cluster:
        from infra.cluster import cluster_up, connection_settings

        console.print(_cluster_table(cluster_up(settings())))
        console.print("point sluice at it with:")
        for key, value in connection_settings(settings()).items():
            console.print(f"  export {key}={value}", soft_wrap=True, highlight=False)


def down() -> None:
    """Stop what `sluice up [--cluster]` started (only their recorded pids)."""
    from infra.cluster import cluster_down
    from infra.stack import stack_down

    stopped = cluster_down(settings()) + [c.name for c in stack_down(settings())]
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


def status() -> None:
    """Show what runs, where, and the topics on the broker; exit 3 if a component is down."""
    from core.kafka import topic_summary
    from infra.cluster import cluster_records, cluster_status
    from infra.stack import stack_status

    components = stack_status(settings())
    console.print(_stack_table(components))
    cluster_down_parts: list[str] = []
    if cluster_records(settings()):
        rows = cluster_status(settings())
        console.print(_cluster_table(rows))
        cluster_down_parts = [r.component.name for r in rows if not r.component.ready]
    broker = next(c for c in components if c.name == "broker")
    topics = topic_summary(settings()) if broker.ready else None
    if topics is not None:
        table = Table()
        table.add_column("topic", overflow="fold")
        table.add_column("partitions", no_wrap=True, justify="right")
        table.add_column("records (approx.)", no_wrap=True, justify="right")
        for name, partitions, records in topics:
            table.add_row(name, str(partitions), str(records))
        console.print(table)
    if cluster_down_parts:
        raise StackError(
            f"cluster not answering: {', '.join(cluster_down_parts)}; run `sluice up --cluster`"
        )
    down = [c for c in components if not c.ready]
    if down:
        what = ", ".join(f"{c.name} at {c.address} ({c.state})" for c in down)
        hint = "start them with `sluice up`" if all(c.managed for c in down) else "check them"
        raise StackError(f"not answering: {what}; {hint}")
    if topics is None:
        raise StackError(f"the broker at {broker.address} answered but did not list its topics")


def jobs(
    cancel: Annotated[
        str | None, typer.Option(help="Cancel this job id (its checkpoints are retained).")
    ] = None,
) -> None:
    """List the jobs of the Flink session cluster at flink_jobmanager, or cancel one."""
    from infra.flink_jobs import cancel_flink_job, flink_jobs

    if not settings().flink_jobmanager:
        raise StackError(
            "flink_jobmanager is not set: `sluice stream` runs on a local mini-cluster; "
            "set SLUICE_FLINK_JOBMANAGER=host:port (see `sluice up --cluster`)"
        )
    if cancel is not None:
        cancel_flink_job(settings(), cancel)
        console.print(f"cancelled {cancel}")
        return
    table = Table(title=f"Flink jobs at {settings().flink_jobmanager}")
    table.add_column("job id", no_wrap=True)
    table.add_column("name", overflow="fold")
    table.add_column("state", no_wrap=True)
    table.add_column("running for", no_wrap=True, justify="right")
    for job in flink_jobs(settings()):
        table.add_row(job["jid"], job["name"], job["state"], f"{job['duration'] / 1000:.0f} s")
    console.print(table)
