"""Every `sluice` failure is one line on stderr with a documented exit code, never a traceback.

Real subprocesses for what only a process shows (the entry point, librdkafka and JVM output,
the exit status): bad arguments, bad settings, and the broker and Redis on closed loopback
ports. They start together, so the file costs about as long as the slowest (a produce that waits
for the broker). The rest runs in-process through cli.main.run, which is what main() calls.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli.main import run
from core.errors import ExitCode, SluiceError
from infra.stack import free_port

pytestmark = pytest.mark.integration
SLUICE = str(Path(sys.executable).parent / "sluice")
README = Path(__file__).resolve().parents[2] / "README.md"


def closed_env(root: Path) -> dict[str, str]:
    """The caller's environment without SLUICE_*, pointed at closed loopback ports."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SLUICE_")}
    (root / "history").mkdir(parents=True, exist_ok=True)
    return env | {
        "SLUICE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "SLUICE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "SLUICE_STATE_DIR": str(root / "state"),
        "SLUICE_HISTORY_DIR": str(root / "history"),
        "SLUICE_OFFLINE_STORE_DIR": str(root / "offline"),
        "SLUICE_FEAST_REGISTRY": str(root / "registry.db"),
        "SLUICE_MODELS_DIR": str(root / "models"),
        "COLUMNS": "200",
    }


# A bug, through the real entry point: stack_status raises something no one expected.
CRASH = (
    "import sys, infra.stack as s\n"
    "def boom(settings): raise ZeroDivisionError('boom')\n"
    "s.stack_status = boom\n"
    "from cli.main import main\n"
    "sys.argv = ['sluice', 'status']\n"
    "main()\n"
)


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    code: ExitCode
    words: str  # the error line contains these
    env: tuple[tuple[str, str], ...] = ()

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-c", CRASH] if self.args == ("crash",) else [SLUICE, *self.args]


CASES = {
    "status, nothing runs": Case(("status",), ExitCode.UNREACHABLE, "not answering: broker at"),
    "stream, no broker": Case(("stream",), ExitCode.UNREACHABLE, "no Kafka broker answers at"),
    "produce, no broker": Case(
        ("produce", "--events", "10"), ExitCode.UNREACHABLE, "no Kafka broker answers at"
    ),
    "ingest, no broker": Case(
        ("ingest", "--idle-timeout", "1"), ExitCode.UNREACHABLE, "no Kafka broker answers at"
    ),
    "backfill, no redis": Case(
        ("backfill", "--start", "2026-01-01", "--end", "2026-01-02"),
        ExitCode.UNREACHABLE,
        "(SLUICE_REDIS_URL) does not answer",
    ),
    "bad kafka config": Case(
        ("status",),
        ExitCode.USAGE,
        "invalid setting SLUICE_KAFKA_CONFIG: not a JSON object",
        (("SLUICE_KAFKA_CONFIG", '{"sasl.password": "hunter2"'),),
    ),
    "crash": Case(("crash",), ExitCode.INTERNAL, "internal error: ZeroDivisionError: boom"),
}


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def state_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-errors")


@pytest.fixture(scope="module")
def outcomes(state_root: Path) -> dict[str, Outcome]:
    """Every CASE as a real process, all started at once (most of them wait, not compute)."""
    env = closed_env(state_root)
    procs = {
        name: subprocess.Popen(
            case.argv,
            env=env | dict(case.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, case in CASES.items()
    }
    done = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        done[name] = Outcome(proc.returncode, stdout, stderr)
    return done


def assert_one_line(stderr: str, words: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("error: "), stderr
    assert words in lines[0], stderr
    return lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_a_failing_command_is_one_line_and_a_documented_code(outcomes, name):
    case, outcome = CASES[name], outcomes[name]
    assert outcome.code == case.code, (outcome.stdout, outcome.stderr)
    line = assert_one_line(outcome.stderr, case.words)
    assert "hunter2" not in line


def test_status_still_shows_the_table_when_it_fails(outcomes):
    stdout = outcomes["status, nothing runs"].stdout
    assert re.search(r"│ broker\s+│ stopped\s+│", stdout), stdout
    assert re.search(r"│ redis\s+│ stopped\s+│", stdout), stdout


def test_the_traceback_of_a_bug_is_in_the_named_log(outcomes, state_root: Path):
    line = outcomes["crash"].stderr.strip()
    logged = re.search(r"the traceback is in (\S+\.log)", line)
    assert logged, line
    path = Path(logged.group(1))
    assert path.parent == state_root / "state" / "logs"
    text = path.read_text()
    assert "Traceback" in text
    assert "ZeroDivisionError: boom" in text
    assert "sluice status" in text


# In-process: cli.main.run is what main() calls.


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    for name in list(os.environ):
        if name.upper().startswith("SLUICE_"):
            monkeypatch.delenv(name)
    for name, value in closed_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    yield monkeypatch
    # The callback configures the "sluice" logger and warnings capture for a CLI run.
    logging.captureWarnings(False)
    for name in ("sluice", "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["backfill", "--start", "2026-13-05", "--end", "2026-01-01"], 2, "--start '2026-13-05'"),
        (["backfill", "--start", "2026-01-01"], 2, "no end day: give --end"),
        (["backfill", "--start", "2026-01-01", "--end", "x"], 2, "--end 'x': expected a date"),
        (
            ["backfill", "--start", "2026-01-01", "--end", "2026-01-02", "--view", "nope"],
            2,
            "--view nope: no such feature view; known: ",
        ),
        (["stream", "--view", "nope"], 2, "--view nope: no such feature view"),
        (["stream", "--until", "soon"], 2, "--until 'soon': expected an ISO date"),
        (["backfill"], 2, "Missing option '--start'; see `sluice backfill --help`"),
        (["backfill", "--bogus"], 2, "No such option: --bogus"),
        (["produce", "--events", "0"], 2, "Invalid value for '--events'"),
        (["--log-level", "loud", "status"], 2, "Invalid value for '--log-level'"),
        (["--config", "/nonexistent/sluice.yaml", "status"], 2, "config file /nonexistent"),
        (["features", "describe", "nope"], 9, "no definition 'nope'"),
        (
            ["backfill", "--start", "2026-01-05", "--end", "2026-01-01"],
            2,
            "--end 2026-01-01 is not after --start 2026-01-05",
        ),
        (["nosuch"], 2, "No such command 'nosuch'"),
    ],
)
def test_bad_arguments(cli, capfd, args, code, words):
    assert run(args) == code
    assert_one_line(capfd.readouterr().err, words)


@pytest.mark.parametrize(
    ("variable", "value", "code", "words"),
    [
        (
            "SLUICE_TOPIC_PARTITIONS",
            "x",
            2,
            "invalid setting SLUICE_TOPIC_PARTITIONS: expected an integer from 1 to 1024, got 'x'",
        ),
        ("SLUICE_SERVE_MODELS", "[a", 2, "invalid setting SLUICE_SERVE_MODELS: not a JSON list"),
        # A plain list of names works: serve gets as far as the (empty) model registry.
        ("SLUICE_SERVE_MODELS", "a,b", 9, "model 'a' has no production version"),
        ("SLUICE_MODELS_DIR", "ftp://h/m", 2, "SLUICE_MODELS_DIR: 'ftp://h/m': scheme 'ftp'"),
    ],
)
def test_bad_settings(cli, capfd, variable, value, code, words):
    cli.setenv(variable, value)
    assert run(["serve"]) == code
    assert_one_line(capfd.readouterr().err, words)


def test_a_broken_definitions_module_is_a_definition_error(cli, capfd, tmp_path: Path):
    (tmp_path / "broken_defs_cli.py").write_text("raise RuntimeError('half-written')\n")
    cli.syspath_prepend(str(tmp_path))
    cli.setenv("SLUICE_DEFINITIONS_MODULE", "broken_defs_cli")
    assert run(["stream"]) == ExitCode.DEFINITION
    assert_one_line(capfd.readouterr().err, "RuntimeError: half-written")


def test_missing_history_is_a_data_error(cli, capsys, tmp_path: Path):
    cli.setenv("SLUICE_HISTORY_DIR", str(tmp_path / "nowhere"))
    assert run(["backfill", "--start", "2026-01-01", "--end", "2026-01-02"]) == ExitCode.DATA
    assert_one_line(capsys.readouterr().err, "no event history at")


def test_a_misspelt_variable_is_a_warning_line_only(cli, capsys):
    cli.setenv("SLUICE_REDIS_URI", "redis://elsewhere:1/0")
    assert run(["features", "env"]) == 0
    out = capsys.readouterr()
    assert out.err.strip() == (
        "warning: SLUICE_REDIS_URI is not a Sluice setting and is ignored "
        "(did you mean SLUICE_REDIS_URL?)"
    )
    assert "export SLUICE_FEAST_PROJECT=" in out.out


def test_a_multi_line_message_is_printed_as_one_line(cli, capsys, monkeypatch):
    def fail(settings: object) -> None:
        raise SluiceError("first line\n  second line\n")

    monkeypatch.setattr("infra.stack.stack_status", fail)
    assert run(["status"]) == ExitCode.INTERNAL  # SluiceError's own code
    assert capsys.readouterr().err.strip() == "error: first line; second line"


def test_ctrl_c_is_130(cli, capsys, monkeypatch):
    def interrupt(settings: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("infra.stack.stack_status", interrupt)
    assert run(["status"]) == ExitCode.INTERRUPTED
    assert "Traceback" not in capsys.readouterr().err


def test_no_arguments_shows_the_help_and_exits_2(cli, capsys):
    assert run([]) == ExitCode.USAGE
    out = capsys.readouterr()
    assert "Usage" in out.out
    assert "error" not in out.err


def test_readme_lists_every_exit_code():
    section = README.read_text().split("### Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", section, re.MULTILINE)}
    assert documented == {int(code) for code in ExitCode}
