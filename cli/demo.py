"""`sluice demo`: the pipeline end to end on the local stack, as the domain's ``demo`` hook
(a callable of settings.definitions_module; see examples/delivery/features.py) runs it."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import console, settings
from cli.events import require_hook


def demo(
    events: Annotated[int, typer.Option(min=1, help="Events to generate.")] = 20_000,
    keep_up: Annotated[bool, typer.Option(help="Leave the stack running afterwards.")] = False,
) -> None:
    """Run the domain's demo: the pipeline end to end on the local stack, with checks."""
    run_demo = require_hook("demo", "the end-to-end run of `sluice demo`")
    run_demo(settings(), console, events=events, keep_up=keep_up)
