"""Faster ``Row`` methods for PyFlink's keyed operators: the same answers, without exceptions.

Why. PyFlink's keyed Python operator builds a ``Row`` around every element's key
(``state_key_selector``), compares it with the current key and reads its fields
(``RemoteKeyedStateBackend.set_current_key``: ``key == self._current_key``, then
``key.get_fields_by_names``); its input coder builds the element's rows. On a positional row,
``Row.__eq__`` and ``get_fields_by_names`` ask ``hasattr(row, "_fields")``, and each ``hasattr``
goes through ``Row.__getattr__``, which raises AttributeError; ``Row.__init__`` and
``set_row_kind`` set each attribute through ``Row.__setattr__``'s name checks. In py-spy
profiles of the tile engine's Python worker (bench.stream): the comparison was 7.2% of the
worker's time (400k events), and after it was fixed, ``get_fields_by_names`` 3.8%, ``__init__``
5.5% and ``set_row_kind`` 0.7% (200k events, 2026-12-06).

What. For rows of exactly the class ``Row``, each method reads or writes the instance's
``__dict__`` (where ``Row.__setattr__`` puts the attributes; the class has none of its own) and
answers as the original does; any other case (named rows, subclasses, something that is not a
Row, a row missing an attribute, keyword arguments) goes to the original.
tests/unit/test_fast_rows.py holds each to the original's answers. Installed by the stream
functions' ``open`` (in the Python worker, which may be this process: PyFlink's loopback mode),
once per process; ``installed()`` tells.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_MARK = "_sluice_fast_row"
Method = Callable[..., Any]


def fast_row_eq(original: Method, row_class: type) -> Method:
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
        return bool(original(self, other))

    return row_eq


def fast_get_fields_by_names(original: Method, row_class: type) -> Method:
    """``Row.get_fields_by_names``: a positional row's values are its fields, whatever names."""

    def get_fields_by_names(self: Any, names: Any) -> Any:
        if type(self) is row_class:
            mine = self.__dict__
            if "_fields" not in mine and "_values" in mine:
                return mine["_values"]
        return original(self, names)

    return get_fields_by_names


def fast_init(original: Method, row_class: type) -> Method:
    """``Row.__init__`` of a positional row: its values and the kind INSERT."""
    from pyflink.common.types import RowKind

    insert = RowKind.INSERT

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        if kwargs or type(self) is not row_class:
            original(self, *args, **kwargs)
            return
        mine = self.__dict__
        mine["_values"] = list(args)
        mine["_row_kind"] = insert

    return init


def fast_set_row_kind(original: Method, row_class: type) -> Method:
    """``Row.set_row_kind``."""

    def set_row_kind(self: Any, row_kind: Any) -> None:
        if type(self) is row_class:
            self.__dict__["_row_kind"] = row_kind
            return
        original(self, row_kind)

    return set_row_kind


# Row's method name -> the factory of its fast version.
FAST = {
    "__eq__": fast_row_eq,
    "get_fields_by_names": fast_get_fields_by_names,
    "__init__": fast_init,
    "set_row_kind": fast_set_row_kind,
}


def install() -> None:
    """Replace the methods of ``pyflink.common.types.Row`` named in FAST, once each (its
    ``__hash__`` stays as it is)."""
    from pyflink.common.types import Row

    for name, factory in FAST.items():
        current = getattr(Row, name)
        if getattr(current, _MARK, False):
            continue
        fast = factory(current, Row)
        setattr(fast, _MARK, True)
        fast.__wrapped__ = current  # type: ignore[attr-defined]
        setattr(Row, name, fast)


def installed() -> bool:
    from pyflink.common.types import Row

    return all(getattr(getattr(Row, name), _MARK, False) for name in FAST)


def original(name: str) -> Method:
    """PyFlink's own ``Row.<name>``, installed or not."""
    from pyflink.common.types import Row

    method: Method = getattr(Row, name)
    return getattr(method, "__wrapped__", method) if getattr(method, _MARK, False) else method
