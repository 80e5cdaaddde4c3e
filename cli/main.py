"""`sluice`: one command line for the stack, events, features and engines.

One module per command group (cli/stack.py, events.py, features.py, backfill.py, stream.py,
models.py, demo.py); this module registers them and owns how a run ends. Every failure is ONE
line on stderr and a documented exit code (core.errors.ExitCode, listed in README.md):

- a SluiceError: ``error: <message>``, exit ``exc.exit_code``;
- a usage error (Typer/click: unknown option, missing argument, bad value): one line naming
  it and the command's --help, exit 2 (ExitCode.USAGE);
- Ctrl-C: exit 130;
- anything else is a bug: one line naming the exception and the file under
  ``<state_dir>/logs/`` that holds the full traceback, exit 1 (ExitCode.INTERNAL).

Unknown SLUICE_* variables print one warning line each and change nothing else. Heavy engines
(Spark, Flink, Feast) are imported inside the commands that need them, so that `sluice --help`
answers at once.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

# Typer vendors click (typer._click); its usage errors are TyperExceptions.
from typer._click.exceptions import NoArgsIsHelpError
from typer._click.exceptions import UsageError as ClickUsageError

from cli import archive, backfill, demo, events, models, monitor, stack, stream
from cli.common import loaded_settings, print_error, print_warning, set_settings, settings
from cli.features import features_app
from core.errors import ExitCode, SluiceError
from core.logs import configure_logging, scrub
from core.settings import load_settings, unknown_variables
from core.settings_values import default_state_dir

__all__ = ["app", "main", "run", "settings"]

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
    stack.jobs,
    events.produce,
    events.ingest,
    archive.archive,
    backfill.backfill,
    stream.stream,
    models.train,
    models.retrain,
    models.score,
    models.serve,
    monitor.monitor,
    demo.demo,
):
    app.command()(command)


class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


@app.callback()
def _main(
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML settings file (else SLUICE_CONFIG).")
    ] = None,
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="Structured log level on stderr.")
    ] = LogLevel.WARNING,
) -> None:
    configure_logging(log_level.value)
    for warning in unknown_variables():
        print_warning(warning)
    set_settings(load_settings(config))


def _crash_log(exc: BaseException) -> Path | None:
    """Write the traceback under <state_dir>/logs/ (else the temp dir); None if neither works."""
    loaded = loaded_settings()
    state_dir = loaded.state_dir if loaded is not None else default_state_dir()
    text = "".join(
        [
            f"sluice {' '.join(sys.argv[1:])}\n",
            f"at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}, pid {os.getpid()}\n\n",
            *traceback.format_exception(exc),
        ]
    )
    name = f"crash-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    for folder in (state_dir / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(scrub(text))
            return path
        except OSError:
            continue
    return None


def _usage_line(exc: ClickUsageError) -> str:
    where = f"; see `{exc.ctx.command_path} --help`" if exc.ctx is not None else ""
    return f"{exc.format_message().rstrip('.')}{where}"


def run(args: Sequence[str] | None = None) -> int:
    """Run `sluice` with ``args`` (default: sys.argv); return its exit code.

    Output and errors go to stdout and stderr; every failure is one line (see the module doc).
    """
    try:
        result = app(
            args=list(args) if args is not None else None,
            prog_name="sluice",
            standalone_mode=False,
        )
    except SluiceError as exc:
        print_error(str(exc))
        return int(exc.exit_code)
    except NoArgsIsHelpError:
        # `sluice` or `sluice features` alone: Typer has printed the help; exit 2.
        return int(ExitCode.USAGE)
    except ClickUsageError as exc:
        print_error(_usage_line(exc))
        return int(ExitCode.USAGE)
    except typer.TyperException as exc:  # e.g. a file argument that cannot be opened
        print_error(exc.format_message())
        return int(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print_error("interrupted")
        return int(ExitCode.INTERRUPTED)
    except Exception as exc:  # the last resort: a bug, reported in one line plus a log file
        path = _crash_log(exc)
        where = f"the traceback is in {path}" if path else "no log could be written"
        print_error(
            f"internal error: {type(exc).__name__}: {exc} (a bug in Sluice; please report it; "
            f"{where})"
        )
        return int(ExitCode.INTERNAL)
    # standalone_mode=False: click returns typer.Exit's code, or the command's return value.
    return result if isinstance(result, int) else int(ExitCode.OK)


def main() -> None:
    raise SystemExit(run())
