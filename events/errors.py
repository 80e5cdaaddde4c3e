"""Typed errors of the events package (ingest, history, archive), in one place."""

from __future__ import annotations

from core.errors import ExitCode, SluiceError


class IngestError(SluiceError):
    """The ingest loop could not consume (no partitions assigned, broker errors)."""

    exit_code = ExitCode.DELIVERY
    code = "ingest_failed"
