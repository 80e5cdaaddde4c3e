"""`sluice up | down | status`: the local stack."""

from __future__ import annotations

from rich.table import Table

from cli.common import console, settings
from infra.stack import ComponentStatus


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


def up() -> None:
    """Start the local broker and Redis on loopback (idempotent); wait until both answer."""
    from infra.stack import stack_up

    console.print(_stack_table(stack_up(settings())))


def down() -> None:
    """Stop the broker and Redis that `sluice up` started (only their recorded pids)."""
    from infra.stack import stack_down

    stopped = [c.name for c in stack_down(settings())]
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


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
