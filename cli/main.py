"""`sluice`: one command line for the stack, events, features and engines.

One module per command group (cli/stack.py, events.py, features.py, backfill.py, stream.py,
models.py, demo.py); this module registers them and turns every SluiceError into one line and
its documented exit code (core.errors.ExitCode). Heavy engines (Spark, Flink, Feast) are imported
inside the commands that need them, so that `sluice --help` answers at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cli import archive, backfill, demo, events, models, stack, stream
from cli.common import set_settings, settings
from cli.features import features_app
from core.errors import SluiceError
from core.logs import configure_logging
from core.settings import load_settings

__all__ = ["app", "main", "settings"]

app = typer.Typer(
    help="Sluice: define features once, compute them with Spark and Flink, serve them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(features_app, name="features")
for command in (
    stack.up,
    stack.down,
    stack.status,
    events.produce,
    events.ingest,
    archive.archive,
    backfill.backfill,
    stream.stream,
    models.train,
    models.serve,
    demo.demo,
):
    app.command()(command)


@app.callback()
def _main(
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML settings file (else SLUICE_CONFIG).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="Structured log level on stderr.")] = "WARNING",
) -> None:
    configure_logging(log_level)
    set_settings(load_settings(config))


def main() -> None:
    try:
        app()
    except SluiceError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False)
        raise SystemExit(int(exc.exit_code)) from None
