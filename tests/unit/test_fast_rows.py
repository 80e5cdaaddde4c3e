"""streaming/fast_rows.py: PyFlink's Row answers the same with the fast methods as without."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from streaming import fast_rows


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


def _outcome(call: Any) -> Any:
    """What a call returns, or the type of what it raises."""
    try:
        return ("returned", call())
    except Exception as error:  # the answer under test is the exception's type
        return ("raised", type(error))


def test_the_fast_eq_answers_as_the_original_for_every_pair() -> None:
    from pyflink.common.types import Row

    original = fast_rows.original("__eq__")
    fast = fast_rows.fast_row_eq(original, Row)
    compared = raised = 0
    for a, b in itertools.product(_rows(), repeat=2):
        if not isinstance(a, Row):
            continue
        want = _outcome(lambda: original(a, b))  # noqa: B023  # called right away
        assert _outcome(lambda: fast(a, b)) == want, (a, b)  # noqa: B023
        compared += 1
        raised += want[0] == "raised"
    assert compared > 150
    assert raised > 0  # a row without attributes: both raise


def test_the_fast_field_read_answers_as_the_original() -> None:
    from pyflink.common.types import Row

    original = fast_rows.original("get_fields_by_names")
    fast = fast_rows.fast_get_fields_by_names(original, Row)
    names_tried: tuple[list[str], ...] = (["k"], ["j"], [], ["k", "j"], ["f0"])
    checked = raised = 0
    for row, names in itertools.product(_rows(), names_tried):
        if not isinstance(row, Row):
            continue
        want = _outcome(lambda: original(row, names))  # noqa: B023
        assert _outcome(lambda: fast(row, names)) == want, (row, names)  # noqa: B023
        checked += 1
        raised += want[0] == "raised"
    assert checked > 50
    assert raised > 0  # a named row asked for a name it lacks


def test_the_fast_init_and_kind_build_the_same_rows() -> None:
    from pyflink.common.types import Row, RowKind

    init = fast_rows.fast_init(fast_rows.original("__init__"), Row)
    set_kind = fast_rows.fast_set_row_kind(fast_rows.original("set_row_kind"), Row)
    for args in ((), (1,), (1, "a", None), (Row(2), [3]), (b"x", 1.5)):
        built = Row.__new__(Row)
        init(built, *args)
        want = Row.__new__(Row)
        fast_rows.original("__init__")(want, *args)
        assert built.__dict__ == want.__dict__
        assert built.__dict__["_values"] is not want.__dict__["_values"]
        for kind in (RowKind.DELETE, RowKind.UPDATE_AFTER):
            set_kind(built, kind)
            fast_rows.original("set_row_kind")(want, kind)
            assert built.__dict__ == want.__dict__
    named = Row.__new__(Row)
    init(named, k=1, j=2)  # keywords: the original's named row
    assert named.as_dict() == {"k": 1, "j": 2}
    with pytest.raises(ValueError, match="both"):
        init(Row.__new__(Row), 1, k=2)


def test_install_replaces_each_once_and_keeps_hashing() -> None:
    from pyflink.common.types import Row, RowKind

    fast_rows.install()
    replaced = {name: getattr(Row, name) for name in fast_rows.FAST}
    fast_rows.install()
    assert {name: getattr(Row, name) for name in fast_rows.FAST} == replaced
    assert fast_rows.installed()
    for name in fast_rows.FAST:
        assert fast_rows.original(name) is not replaced[name]
    assert Row(1) == Row(1)
    assert Row(1) != Row(2)
    assert Row(k=1) == Row(k=1)
    assert Row(k=1).as_dict() == {"k": 1}
    assert Row(1, "a").get_fields_by_names(["x", "y"]) == [1, "a"]
    row = Row(1)
    row.set_row_kind(RowKind.DELETE)
    assert row.get_row_kind() is RowKind.DELETE
    assert row != Row(1)
    assert hash(Row(1, "a")) == hash((1, "a"))
    assert {Row(1): "x"}[Row(1)] == "x"
