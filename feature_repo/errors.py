"""Typed errors of the Feast repository package, in one place."""

from __future__ import annotations

from core.errors import ExitCode, SluiceError


class FeatureRepoError(SluiceError):
    """Base of every error raised by feature_repo/."""

    exit_code = ExitCode.DEFINITION
    code = "feature_repo_error"


class FeastTranslationError(FeatureRepoError):
    """A definition cannot be expressed as Feast objects; the message names it."""


class FeastRegistryError(FeatureRepoError):
    """Feast refused to plan or apply the objects, or its registry could not be read."""

    exit_code = ExitCode.STORAGE


class OnlineStoreError(FeatureRepoError):
    """A row cannot be written (wrong type, missing feature) or a stored value cannot be read."""

    exit_code = ExitCode.STORAGE
    code = "online_store_error"


class OnlineStoreUnavailableError(OnlineStoreError):
    """The store did not answer in time, or refused the connection: it is slow or down, which
    a caller may wait out (serving/breaker.py counts these), unlike a bad row or value."""

    exit_code = ExitCode.UNAVAILABLE
    code = "online_store_unavailable"
