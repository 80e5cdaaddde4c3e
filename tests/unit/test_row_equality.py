"""streaming/row_equality.py: PyFlink's Row compares the same with the fast __eq__ as without."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from streaming import row_equality


def _rows() -> list[Any]:
    from pyflink.common.types import Row, RowKind

    class Subclass(Row):  # type: ignore[misc]  # a subclass: always the original's answer
        pass

    deleted = Row(3)
    deleted.set_row_kind(RowKind.DELETE)
    bare = Row.__new__(Row)  # no attributes at all
    return [
        *(Row(3), Row(3), Row(4), Row(3, "a"), Row(3.0), Row(), Row(Row(3)), Row(Row(4))),
        *(deleted, Row(k=3), Row(k=3), Row(j=3), Subclass(3), bare),
        *((3,), [3], 3, None),
    ]


def test_the_fast_eq_answers_as_the_original_for_every_pair() -> None:
    from pyflink.common.types import Row

    original = row_equality.original()
    fast = row_equality.fast_row_eq(original, Row)
    compared = raised = 0
    for a, b in itertools.product(_rows(), repeat=2):
        if not isinstance(a, Row):
            continue
        try:
            want: Any = original(a, b)
        except AttributeError:  # a row without attributes: the original raises
            with pytest.raises(AttributeError):
                fast(a, b)
            raised += 1
            continue
        assert fast(a, b) == want, (a, b)
        compared += 1
    assert compared > 150
    assert raised > 0


def test_install_replaces_it_once_and_keeps_hashing() -> None:
    from pyflink.common.types import Row

    row_equality.install()
    replaced = Row.__eq__
    row_equality.install()
    assert Row.__eq__ is replaced
    assert row_equality.installed()
    assert row_equality.original() is not replaced
    assert Row(1) == Row(1)
    assert Row(1) != Row(2)
    assert Row(k=1) == Row(k=1)
    assert hash(Row(1, "a")) == hash((1, "a"))
    assert {Row(1): "x"}[Row(1)] == "x"
