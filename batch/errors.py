"""Typed errors of the batch (Spark) engine, in one place. The CLI maps each to an exit code."""

from __future__ import annotations


class SluiceBatchError(Exception):
    """Base of every error raised by the batch package. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UnsupportedAggregationError(SluiceBatchError):
    """A feature view uses an aggregation the Spark compiler cannot express.

    Raised by ``compile_view`` before any Spark job runs, naming the view and the feature.
    """

    exit_code = 7

    def __init__(self, view: str, feature: str, reason: str) -> None:
        self.view, self.feature, self.reason = view, feature, reason
        super().__init__(f"feature view {view!r}: feature {feature!r}: {reason}")


class EventSchemaError(SluiceBatchError):
    """The events (or labels) DataFrame lacks a column a view needs, or has the wrong type."""

    exit_code = 7

    def __init__(self, what: str, column: str, reason: str) -> None:
        self.what, self.column, self.reason = what, column, reason
        super().__init__(f"{what}: column {column!r}: {reason}")


class BackfillRangeError(SluiceBatchError):
    """A backfill was asked for an empty or inverted date range."""

    exit_code = 2


class OfflineStoreError(SluiceBatchError):
    """The offline store or its backfill state file could not be read or written."""

    exit_code = 8
