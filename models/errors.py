"""Typed errors of the models package (model registry, fitting), in one place."""

from __future__ import annotations

from core.errors import ExitCode, SluiceError


class ModelError(SluiceError):
    """Base of every error raised by models/."""

    exit_code = ExitCode.STORAGE
    code = "model_error"


class ModelNotFoundError(ModelError):
    """No such model, version or production pointer in the registry (or not served here)."""

    exit_code = ExitCode.NOT_FOUND
    code = "model_not_found"


class ModelRegistryError(ModelError):
    """The registry could not be read or written, or holds an unreadable model."""

    code = "model_registry_error"


class TrainingDataError(ModelError):
    """Training data is empty, lacks a column, or leaves nothing to evaluate on."""

    exit_code = ExitCode.DATA
    code = "training_data_error"


class RolloutConflictError(ModelError):
    """A rollout change contradicts the state: a canary or shadow of the production version, a
    rollback with no previous production."""

    exit_code = ExitCode.CONFLICT
    code = "rollout_conflict"
