"""`sluice demo`: the pipeline end to end on the local stack."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import console, settings


def demo(
    events: Annotated[int, typer.Option(min=1, help="Events to generate.")] = 20_000,
    keep_up: Annotated[bool, typer.Option(help="Leave the stack running afterwards.")] = False,
) -> None:
    """Run the pipeline end to end on the local stack and say what happened."""
    from examples.delivery.demo import run_demo

    run_demo(settings(), console, events=events, keep_up=keep_up)
