"""Checked reading of a record's JSON, shared by every typed record (core/records.py,
core/stream_stats.py): each problem raises RecordError naming the field and the reason."""

from __future__ import annotations

from typing import Any, NoReturn

import orjson

from core.errors import RecordError

_JSON_TYPES = (
    (type(None), "null"),
    (bool, "boolean"),  # before int: a bool is an int in Python
    (int, "integer"),
    (float, "number"),
    (str, "string"),
    (list, "array"),
)


def json_type(value: Any) -> str:
    return next((name for t, name in _JSON_TYPES if isinstance(value, t)), "object")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float)


class Fields:
    """Checked access to one record's decoded JSON object: each problem names its field."""

    __slots__ = ("kind", "obj", "version")

    def __init__(self, kind: str, data: bytes | None, supported: int) -> None:
        self.kind = kind
        if data is None:
            self.fail(None, "the record has no value")
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            self.fail(None, f"not JSON ({exc})")
        if not isinstance(obj, dict):
            self.fail(None, f"expected a JSON object, got {json_type(obj)}")
        self.obj: dict[str, Any] = obj
        self.version = check_version(kind, "v", obj.get("v", 1), supported)

    def fail(self, name: str | None, reason: str) -> NoReturn:
        raise RecordError(self.kind, name, reason)

    def _get(self, name: str) -> Any:
        if name not in self.obj:
            self.fail(name, "missing")
        return self.obj[name]

    def _wrong(self, name: str, expected: str, value: Any) -> NoReturn:
        self.fail(name, f"expected {expected}, got {json_type(value)}")

    def text(self, name: str) -> str:
        value = self._get(name)
        if not isinstance(value, str):
            self._wrong(name, "a string", value)
        return value

    def integer(self, name: str) -> int:
        value = self._get(name)
        if not is_int(value):
            self._wrong(name, "an integer", value)
        return int(value)

    def opt_integer(self, name: str) -> int | None:
        return None if self.obj.get(name) is None else self.integer(name)

    def number(self, name: str) -> float:
        value = self._get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self._wrong(name, "a number", value)
        return float(value)

    def opt_number(self, name: str) -> float | None:
        return None if self.obj.get(name) is None else self.number(name)

    def opt_text(self, name: str) -> str | None:
        return None if self.obj.get(name) is None else self.text(name)

    def boolean(self, name: str) -> bool:
        value = self._get(name)
        if not isinstance(value, bool):
            self._wrong(name, "true or false", value)
        return value

    def _object(self, name: str) -> dict[str, Any]:
        value = self._get(name)
        if not isinstance(value, dict):
            self._wrong(name, "an object", value)
        return value

    def scalars(self, name: str) -> dict[str, Any]:
        """An object of JSON scalars (string, number, boolean or null): feature values."""
        value = self._object(name)
        for key, item in value.items():
            if not is_scalar(item):
                self.fail(f"{name}.{key}", f"expected a scalar, got {json_type(item)}")
        return value

    def opt_integers(self, name: str) -> dict[str, int | None]:
        value = self._object(name)
        for key, item in value.items():
            if item is not None and not is_int(item):
                self.fail(f"{name}.{key}", f"expected an integer or null, got {json_type(item)}")
        return value

    def int_map(self, name: str) -> dict[int, int]:
        """An object of integer keys (written as strings) to integers: offsets per partition."""
        out: dict[int, int] = {}
        for key, item in self._object(name).items():
            if not key.lstrip("-").isdigit() or not is_int(item):
                self.fail(f"{name}.{key}", "expected an integer key and an integer value")
            out[int(key)] = item
        return out

    def strings(self, name: str) -> list[str]:
        value = self._get(name)
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            self._wrong(name, "an array of strings", value)
        return value


def check_version(kind: str, name: str, version: Any, supported: int) -> int:
    if not is_int(version) or version < 1:
        raise RecordError(kind, name, f"expected a version number >= 1, got {version!r}")
    if version > supported:
        raise RecordError(
            kind, name, f"version {version} is newer than this Sluice reads ({supported})"
        )
    return int(version)
