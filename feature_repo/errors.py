"""Typed errors of the Feast repository package. The CLI prints them and exits with exit_code."""

from __future__ import annotations

from features.errors import SluiceFeaturesError


class FeatureRepoError(SluiceFeaturesError):
    """Base of every error raised by feature_repo/."""

    exit_code = 7


class FeastTranslationError(FeatureRepoError):
    """A definition cannot be expressed as Feast objects; the message names it."""


class FeastRegistryError(FeatureRepoError):
    """Feast refused to plan or apply the objects, or its registry could not be read."""


class OnlineStoreError(FeatureRepoError):
    """A row cannot be written (wrong type, missing feature) or a stored value cannot be read."""
