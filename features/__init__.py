"""Sluice feature definitions: the single source of truth both engines compile.

This package depends on nothing heavier than pydantic (and orjson for fast JSON).
"""

from features.errors import FeatureDefinitionError, SluiceFeaturesError
from features.labels import LabelJoin, Labels
from features.schema import EventSource, Field, FieldType
from features.validation import EventValidator, Rejection, RejectReason, ValidEvent

__all__ = [
    "EventSource",
    "EventValidator",
    "FeatureDefinitionError",
    "Field",
    "FieldType",
    "LabelJoin",
    "Labels",
    "RejectReason",
    "Rejection",
    "SluiceFeaturesError",
    "ValidEvent",
]
