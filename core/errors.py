"""One error hierarchy for every package: one root, one table of exit codes, one HTTP mapping.

Each package declares its own errors in its own ``errors.py`` as subclasses of ``SluiceError``
and picks an ``ExitCode`` from the table below; nothing else chooses a number. The CLI prints
any ``SluiceError`` as one line and exits with ``exit_code``; the predictor answers with
``http_status(exc)``. docs/architecture.md lists the codes for users.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    """What `sluice` exits with. Documented in README.md ("Exit codes"); never reuse a number."""

    OK = 0
    INTERNAL = 1  # a bug in Sluice: please report it with the log
    USAGE = 2  # a bad argument, setting or config file (Typer's own usage errors are 2 too)
    UNREACHABLE = 3  # a service (broker, Redis, cluster) did not answer
    DELIVERY = 4  # records could not be delivered to or consumed from Kafka
    DEFINITION = 5  # a feature definition is invalid, or cannot be compiled or applied
    DATA = 6  # input data is missing or malformed (history, labels, training set)
    STORAGE = 7  # the offline store, model registry or online store could not be read/written
    JOB = 8  # an engine job (Flink, Spark) failed or could not be started or stopped
    NOT_FOUND = 9  # a named model, version or definition does not exist
    UNAVAILABLE = 10  # a dependency is down or the server is overloaded: retry later
    CONFLICT = 11  # the request contradicts what exists (a model reads features a service lacks)
    UNBALANCED = 12  # what went in and what came out do not add up: something was lost
    DEADLINE = 13  # a deadline passed before the work was done: retry, or allow more time
    UNAUTHENTICATED = 14  # no credentials, or credentials nobody issued (an API token)
    FORBIDDEN = 15  # the credentials are valid but do not allow this (a token's scope)
    TOO_LARGE = 16  # the input exceeds a configured limit (a request body's size)
    INTERRUPTED = 130  # Ctrl-C


# The one HTTP mapping: what the API answers for an error of each exit code.
_HTTP_STATUS: dict[ExitCode, int] = {
    ExitCode.USAGE: 422,
    ExitCode.NOT_FOUND: 404,
    ExitCode.CONFLICT: 409,
    ExitCode.DATA: 400,
    ExitCode.UNREACHABLE: 503,
    ExitCode.UNAVAILABLE: 503,
    ExitCode.DEADLINE: 504,
    ExitCode.UNAUTHENTICATED: 401,
    ExitCode.FORBIDDEN: 403,
    ExitCode.TOO_LARGE: 413,
}


class SluiceError(Exception):
    """Root of every error Sluice raises on purpose. The message names what to fix."""

    exit_code: ExitCode = ExitCode.INTERNAL
    # Machine-readable name in API error bodies ({"error": code, "detail": ...}).
    code = "internal_error"

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": str(self)}


def http_status(error: SluiceError) -> int:
    return _HTTP_STATUS.get(error.exit_code, 500)


class SettingsError(SluiceError):
    """A setting (env SLUICE_* or the YAML file) is invalid; the message names it."""

    exit_code = ExitCode.USAGE
    code = "invalid_settings"


class StackError(SluiceError):
    """The local stack could not be started, checked or stopped."""

    exit_code = ExitCode.UNREACHABLE
    code = "stack_error"


class StorageError(SluiceError):
    """A storage URI (file:// or s3://) is malformed, or its store cannot be reached."""

    exit_code = ExitCode.USAGE
    code = "storage_error"


class BrokerUnreachableError(SluiceError):
    """The Kafka broker at settings.kafka_bootstrap did not answer a metadata request."""

    exit_code = ExitCode.UNREACHABLE
    code = "broker_unreachable"


class KafkaDeliveryError(SluiceError):
    """Records could not be delivered to the broker within the time allowed."""

    exit_code = ExitCode.DELIVERY
    code = "kafka_delivery_failed"


class UsageError(SluiceError):
    """A command-line argument is wrong; the message names it and what is expected."""

    exit_code = ExitCode.USAGE
    code = "invalid_argument"


class RecordError(SluiceError):
    """A record read from a topic does not match its schema (core/records.py).

    The message names the record, the field (or header) and the reason.
    """

    exit_code = ExitCode.DATA
    code = "invalid_record"

    def __init__(self, record: str, field: str | None, reason: str) -> None:
        where = f"field {field!r}: " if field else ""
        super().__init__(f"{record} record: {where}{reason}")
        self.record = record
        self.field = field
        self.reason = reason

    def __reduce__(self) -> tuple[type[RecordError], tuple[str, str | None, str]]:
        # Picklable with its three arguments (engines ship errors between processes).
        return type(self), (self.record, self.field, self.reason)
