"""Typed errors of the events package (ingest, history, archive), in one place."""

from __future__ import annotations

from core.errors import ExitCode, SluiceError


class IngestError(SluiceError):
    """The ingest loop could not consume (no partitions assigned, broker errors)."""

    exit_code = ExitCode.DELIVERY
    code = "ingest_failed"


class ArchiveError(SluiceError):
    """The archiver could not consume the events topics (broker errors, no partitions)."""

    exit_code = ExitCode.DELIVERY
    code = "archive_failed"


class ArchiveLockedError(SluiceError):
    """Another archiver holds the history directory: two would write the same offsets twice."""

    exit_code = ExitCode.CONFLICT
    code = "archive_locked"


class ArchiveOffsetError(SluiceError):
    """The offset the archive resumes at is gone from the topic (retention, a recreated topic):
    records between what was archived and what the broker still holds would be lost."""

    exit_code = ExitCode.DELIVERY
    code = "archive_offset_lost"


class ArchiveLayoutError(SluiceError):
    """The archive's parts contradict each other (overlapping offset ranges of one partition):
    files were copied or edited by hand. The message names the files."""

    exit_code = ExitCode.DATA
    code = "archive_layout"
