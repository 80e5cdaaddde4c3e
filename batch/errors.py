"""Typed errors of the batch (Spark) engine, in one place."""

from __future__ import annotations

from core.errors import ExitCode, SluiceError


class SluiceBatchError(SluiceError):
    """Base of every error raised by the batch package."""

    exit_code = ExitCode.JOB
    code = "batch_error"


class UnsupportedAggregationError(SluiceBatchError):
    """A feature view uses an aggregation the Spark compiler cannot express.

    Raised by ``compile_view`` before any Spark job runs, naming the view and the feature.
    """

    exit_code = ExitCode.DEFINITION

    def __init__(self, view: str, feature: str, reason: str) -> None:
        self.view, self.feature, self.reason = view, feature, reason
        super().__init__(f"feature view {view!r}: feature {feature!r}: {reason}")


class EventSchemaError(SluiceBatchError):
    """The events (or labels) DataFrame lacks a column a view needs, or has the wrong type."""

    exit_code = ExitCode.DATA

    def __init__(self, what: str, column: str, reason: str) -> None:
        self.what, self.column, self.reason = what, column, reason
        super().__init__(f"{what}: column {column!r}: {reason}")


class BackfillRangeError(SluiceBatchError):
    """A backfill was asked for an empty or inverted date range."""

    exit_code = ExitCode.USAGE


class HistoryMissingError(SluiceBatchError):
    """The event history a backfill or training run reads is not there (history_dir)."""

    exit_code = ExitCode.DATA


class OfflineStoreError(SluiceBatchError):
    """The offline store or its backfill state file could not be read or written."""

    exit_code = ExitCode.STORAGE


class TrainError(SluiceBatchError):
    """No labels, unknown services, or a training set that cannot be fitted."""

    exit_code = ExitCode.DATA


class ScoreInputError(SluiceBatchError):
    """The input table is missing, lacks a column, or holds values the model cannot take."""

    exit_code = ExitCode.DATA


class ScoreConflictError(SluiceBatchError):
    """The model reads what its service no longer provides, a column clashes, or the output
    exists."""

    exit_code = ExitCode.CONFLICT


class ScoreCountError(SluiceBatchError):
    """The output does not hold one row per input row."""

    exit_code = ExitCode.UNBALANCED
