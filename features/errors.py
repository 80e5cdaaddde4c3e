"""Typed errors of the features package, in one place."""

from __future__ import annotations

from core.errors import ExitCode, SluiceError


class SluiceFeaturesError(SluiceError):
    """Base of every error raised by the features package."""

    exit_code = ExitCode.DEFINITION
    code = "invalid_definition"


class FeatureDefinitionError(SluiceFeaturesError):
    """A definition (source, entity, feature view, ...) is invalid.

    Deliberately not a ValueError: pydantic would wrap a ValueError raised by a validator in a
    ValidationError and lose the type.

    The message always names the definition and the field at fault, e.g.
    ``EventSource 'orders': field 'key_field': 'shop' is not a declared field``.
    """

    def __init__(self, kind: str, name: str, field: str, reason: str) -> None:
        self.kind = kind
        self.name = name
        self.field = field
        self.reason = reason
        super().__init__(f"{kind} {name!r}: field {field!r}: {reason}")
