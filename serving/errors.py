"""Typed errors of the serving package, in one place.

The HTTP status of each comes from core.errors.http_status (one table for every package); one
exception handler in app.py answers with it.
"""

from __future__ import annotations

from typing import Any

from core.errors import ExitCode, SluiceError
from models.errors import ModelNotFoundError, ModelRegistryError

__all__ = [
    "DeadlineExceededError",
    "FeatureStoreUnavailableError",
    "FeaturesBehindError",
    "ForbiddenError",
    "InvalidRequestError",
    "ModelIncompatibleError",
    "ModelNotFoundError",
    "ModelRegistryError",
    "OverloadedError",
    "PredictionLogError",
    "RequestTooLargeError",
    "SluiceServingError",
    "UnauthenticatedError",
]


class SluiceServingError(SluiceError):
    """Base of every serving error; ``headers`` go with its HTTP answer."""

    headers: dict[str, str] | None = None


class UnauthenticatedError(SluiceServingError):
    """No bearer token, or one that no setting lists (401, asking for a Bearer token)."""

    exit_code = ExitCode.UNAUTHENTICATED
    code = "unauthenticated"
    headers = {"WWW-Authenticate": "Bearer"}  # noqa: RUF012  # read-only: RFC 6750's challenge


class ForbiddenError(SluiceServingError):
    """A valid token without the route's scope, or an admin route while no admin token is set."""

    exit_code = ExitCode.FORBIDDEN
    code = "forbidden"


class RequestTooLargeError(SluiceServingError):
    """A request body above the max_request_bytes setting (refused before it is parsed)."""

    exit_code = ExitCode.TOO_LARGE
    code = "request_too_large"


class ModelIncompatibleError(SluiceServingError):
    """A model reads features its feature service (as now defined) does not provide."""

    exit_code = ExitCode.CONFLICT
    code = "model_incompatible"


class InvalidRequestError(SluiceServingError):
    """A request that fails validation; ``problems`` name each field and the reason."""

    exit_code = ExitCode.USAGE
    code = "invalid_request"

    def __init__(self, problems: list[dict[str, Any]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p['field']}: {p['reason']}" for p in problems))

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.problems}


class FeatureStoreUnavailableError(SluiceServingError):
    """The online store did not answer; predictions cannot be made without it."""

    exit_code = ExitCode.UNAVAILABLE
    code = "feature_store_unavailable"


class OverloadedError(SluiceServingError):
    """The model's queue is full: the caller should back off and retry."""

    exit_code = ExitCode.UNAVAILABLE
    code = "overloaded"


class PredictionLogError(SluiceServingError):
    """The prediction log's local write-ahead directory cannot be used (locked by another
    predictor, unwritable, or corrupt)."""

    exit_code = ExitCode.STORAGE
    code = "prediction_log_unavailable"


class FeaturesBehindError(SluiceServingError):
    """With serve_behind = "reject": some rows' newest servable row of a view is older than the
    window the availability contract asks for (the stream is late). Retry later."""

    exit_code = ExitCode.UNAVAILABLE
    code = "features_behind"

    def __init__(self, rows: dict[int, list[str]]) -> None:
        self.rows = rows  # request row index -> views behind
        self.views = sorted({view for views in rows.values() for view in views})
        where = ", ".join(f"rows[{i}]: {', '.join(views)}" for i, views in rows.items())
        super().__init__(
            f"features behind the availability contract for view(s) {', '.join(self.views)} "
            f"({where}); the stream has not written the window due yet, retry later"
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": self.code,
            "detail": str(self),
            "views": self.views,
            "rows": [{"row": i, "views": views} for i, views in self.rows.items()],
        }


class DeadlineExceededError(SluiceServingError):
    """The request's deadline passed before its answer was ready (serve_store_unavailable =
    "reject"; with "degraded" the row is answered from the views' empty values instead)."""

    exit_code = ExitCode.DEADLINE
    code = "deadline_exceeded"
