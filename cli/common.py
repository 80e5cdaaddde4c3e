"""What every command module shares: the consoles, the settings the callback read, parsers,
one-line error and warning output, and quick checks that a service answers before a command
starts heavy work (a JVM, a Spark job) that would need it."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from datetime import UTC, date, datetime

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from core.errors import BrokerUnreachableError, ExitCode, SluiceError, UsageError
from core.logs import scrub
from core.settings import Settings
from core.settings_values import LOOPBACK_HOSTS

console = Console()
# Errors and warnings: stderr, never wrapped (one message is one line), never read as markup.
err_console = Console(stderr=True, soft_wrap=True, highlight=False)
_state: dict[str, Settings] = {}


class RedisUnreachableError(SluiceError):
    """The Redis at settings.redis_url (the online store) did not answer a PING."""

    exit_code = ExitCode.UNREACHABLE
    code = "redis_unreachable"


def settings() -> Settings:
    return _state["settings"]


def set_settings(value: Settings) -> None:
    _state["settings"] = value


def loaded_settings() -> Settings | None:
    """The settings the callback read, or None when it has not (yet) read them."""
    return _state.get("settings")


def one_line(text: str) -> str:
    """A message as one line: its lines joined with '; ' (a message should have one anyway)."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def print_error(message: str) -> None:
    """``error: <message>`` as one line on stderr, with any password in it masked."""
    err_console.print(Text.assemble(("error:", "red"), " ", scrub(one_line(message))))


def print_warning(message: str) -> None:
    err_console.print(Text.assemble(("warning:", "yellow"), " ", one_line(message)))


def progress_bar(total: int | None, label: str) -> Progress:
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


def parse_day(value: str, option: str = "date") -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{option} {value!r}: expected a date YYYY-MM-DD") from None


def parse_time(value: str, option: str = "time") -> int:
    """An ISO date or date-time (UTC when it names no zone) as epoch milliseconds."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(
            f"{option} {value!r}: expected an ISO date or date-time (2026-01-05T12:00)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def unknown_views(names: list[str], known: Mapping[str, object], option: str = "--view") -> None:
    """Raise UsageError naming the --view values that are no feature view, and the views."""
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UsageError(
            f"{option} {', '.join(unknown)}: no such feature view; "
            f"known: {', '.join(sorted(known)) or 'none'}"
        )


def _hint(host: str) -> str:
    if host.strip("[]") in LOOPBACK_HOSTS:
        return "start the local stack with `sluice up`"
    return "check the address and that it is reachable from here"


def require_broker(settings: Settings, timeout_s: float = 2.0) -> None:
    """Raise BrokerUnreachableError at once when no bootstrap address accepts a connection.

    Only a TCP connect: librdkafka would retry a closed port until its own timeout. Whether the
    broker speaks Kafka is for the client to find out."""
    problems = []
    for address in settings.kafka_bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
                return
        except OSError as exc:
            problems.append(exc.strerror or type(exc).__name__)
    host = settings.broker_address[0]
    raise BrokerUnreachableError(
        f"no Kafka broker answers at {settings.kafka_bootstrap} (SLUICE_KAFKA_BOOTSTRAP): "
        f"{', '.join(sorted(set(problems))).lower()}; {_hint(host)}"
    )


def require_redis(settings: Settings, timeout_s: float = 2.0) -> None:
    """Raise RedisUnreachableError unless the Redis at settings.redis_url answers a PING."""
    import redis

    try:
        with redis.Redis.from_url(
            settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        ) as client:
            client.ping()
    except redis.RedisError as exc:
        # redis-py's text names the address, never the password.
        reason = one_line(str(exc)).rstrip(".") or type(exc).__name__
        raise RedisUnreachableError(
            f"Redis at {settings.redis_url_masked} (SLUICE_REDIS_URL) does not answer: "
            f"{reason}; {_hint(settings.redis_address[0])}"
        ) from None
