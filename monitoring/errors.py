"""Typed errors of the monitoring package, in one place."""

from __future__ import annotations

from core.errors import ExitCode, SluiceError


class MonitorError(SluiceError):
    """Base of every error raised by monitoring/."""

    exit_code = ExitCode.INTERNAL
    code = "monitor_error"


class MonitorConsumerError(MonitorError):
    """The prediction log, feedback or feature topics could not be read."""

    exit_code = ExitCode.DELIVERY
    code = "monitor_consume_failed"
