"""Typed errors of the streaming (Flink) engine, in one place."""

from __future__ import annotations

from core.errors import ExitCode, SluiceError


class StreamingError(SluiceError):
    """Base of every error raised by streaming/."""

    exit_code = ExitCode.JOB
    code = "stream_error"


class UnsupportedViewError(StreamingError):
    """A feature view cannot be compiled to a Flink job; the message names the view and why.

    Raised at compile time, before any JVM starts, so a bad definition never reaches a cluster.
    """

    exit_code = ExitCode.DEFINITION

    def __init__(self, view: str, field: str, reason: str) -> None:
        self.view = view
        self.field = field
        self.reason = reason
        super().__init__(f"feature view {view!r}: field {field!r}: {reason}")


class StreamJobError(StreamingError):
    """The Flink job failed, or could not be started or stopped; the message says why."""


class WindowStateError(StreamingError):
    """An invariant of the per-key window state broke (an engine bug, never bad input)."""

    exit_code = ExitCode.INTERNAL
