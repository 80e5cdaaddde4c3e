"""Typed errors of the serving package, in one place.

``status`` is the HTTP status the API answers with (one exception handler in app.py maps them);
``exit_code`` is what `sluice train` / `sluice serve` exit with.
"""

from __future__ import annotations

from typing import Any


class SluiceServingError(Exception):
    """Base of every serving error."""

    status = 500
    exit_code = 1
    code = "internal_error"

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": str(self)}


class ModelNotFoundError(SluiceServingError):
    """No such model, version or production pointer in the registry (or not served here)."""

    status = 404
    exit_code = 9
    code = "model_not_found"


class ModelRegistryError(SluiceServingError):
    """The registry could not be read or written, or holds an unreadable model."""

    status = 500
    exit_code = 9
    code = "model_registry_error"


class ModelIncompatibleError(SluiceServingError):
    """A model reads features its feature service (as now defined) does not provide."""

    status = 409
    exit_code = 9
    code = "model_incompatible"


class InvalidRequestError(SluiceServingError):
    """A request that fails validation; ``problems`` name each field and the reason."""

    status = 422
    exit_code = 2
    code = "invalid_request"

    def __init__(self, problems: list[dict[str, Any]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p['field']}: {p['reason']}" for p in problems))

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.problems}


class FeatureStoreUnavailableError(SluiceServingError):
    """The online store did not answer; predictions cannot be made without it."""

    status = 503
    exit_code = 10
    code = "feature_store_unavailable"


class OverloadedError(SluiceServingError):
    """The model's queue is full: the caller should back off and retry."""

    status = 503
    exit_code = 10
    code = "overloaded"


class TrainingDataError(SluiceServingError):
    """Training data is empty, lacks a column, or leaves nothing to evaluate on."""

    status = 400
    exit_code = 11
    code = "training_data_error"
