"""A faster ``Row.__eq__`` for PyFlink's keyed operators: the same answers, without exceptions.

Why. PyFlink's keyed Python operator wraps every element's key in a ``Row`` and compares it with
the current key (``RemoteKeyedStateBackend.set_current_key``: ``key == self._current_key``).
``Row.__eq__`` asks ``hasattr(row, "_fields")`` of both rows; a positional row has no such
attribute, so each ``hasattr`` goes through ``Row.__getattr__``, which raises AttributeError:
two exceptions per element. In a py-spy profile of the tile engine's Python worker (bench.stream,
400k events) that comparison was 7.2% of the worker's time, more than any of Sluice's own
functions but the window values.

What. For two rows of exactly the class ``Row``, this reads the attributes from the instances'
``__dict__`` (where ``Row.__setattr__`` puts them; the class has none of its own) and answers as
the original does: positional rows are equal when their kinds and values are; any other case
(named rows, subclasses, something that is not a Row, a row missing an attribute) goes to the
original. tests/unit/test_row_equality.py holds the two to the same answers. Installed by the
stream functions' ``open`` (in the Python worker, which may be this process: PyFlink's loopback
mode), once per process; ``installed()`` tells.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_MARK = "_sluice_fast_row_eq"
Equality = Callable[[Any, Any], bool]


def fast_row_eq(original: Equality, row_class: type) -> Equality:
    """``Row.__eq__`` with a fast path for positional rows, ``original`` for the rest."""

    def row_eq(self: Any, other: Any) -> bool:
        if type(self) is row_class and type(other) is row_class:
            mine, theirs = self.__dict__, other.__dict__
            if (
                "_fields" not in mine
                and "_fields" not in theirs
                and "_row_kind" in mine
                and "_row_kind" in theirs
                and "_values" in mine
                and "_values" in theirs
            ):
                same_kind = mine["_row_kind"] == theirs["_row_kind"]
                return bool(same_kind and mine["_values"] == theirs["_values"])
        return original(self, other)

    setattr(row_eq, _MARK, True)
    row_eq.__wrapped__ = original  # type: ignore[attr-defined]
    return row_eq


def install() -> None:
    """Replace ``pyflink.common.types.Row.__eq__`` (once; ``__hash__`` stays as it is)."""
    from pyflink.common.types import Row

    if not installed():
        Row.__eq__ = fast_row_eq(Row.__eq__, Row)


def installed() -> bool:
    from pyflink.common.types import Row

    return bool(getattr(Row.__eq__, _MARK, False))


def original() -> Equality:
    """PyFlink's own ``Row.__eq__``, installed or not."""
    from pyflink.common.types import Row

    eq: Equality = Row.__eq__
    return getattr(eq, "__wrapped__", eq) if installed() else eq
