"""The expression language: parsing, types, SQL rendering and SQL null semantics."""

from __future__ import annotations

import pytest

from features.expressions import ExpressionError, compile_python, infer_type, parse, to_sql
from features.schema import FieldType

TYPES = {
    "items": FieldType.INT,
    "subtotal": FieldType.FLOAT,
    "zone_id": FieldType.STRING,
    "vip": FieldType.BOOL,
}


@pytest.mark.parametrize(
    ("text", "sql"),
    [
        ("items >= 2", "(`items` >= 2)"),
        ("zone_id == 'z''1'", "(`zone_id` = 'z''1')"),
        ("a != b", "(`a` <> `b`)"),
        ("1 + 2 * 3", "(1 + (2 * 3))"),
        ("(1 + 2) * 3", "((1 + 2) * 3)"),
        ("not vip or items > 1", "((NOT `vip`) OR (`items` > 1))"),
        ("not items > 1", "(NOT (`items` > 1))"),
        ("-items", "(-`items`)"),
        ("abs(subtotal)", "ABS(`subtotal`)"),
        ("coalesce(subtotal, 0.5)", "COALESCE(`subtotal`, CAST(0.5 AS DOUBLE))"),
        ("a and b or c", "((`a` AND `b`) OR `c`)"),
    ],
)
def test_precedence_and_sql(text, sql):
    assert to_sql(parse(text)) == sql


def test_division_is_float_and_null_on_zero_in_both_worlds():
    expr = parse("subtotal / items")
    assert "CASE WHEN `items` = 0 THEN NULL" in to_sql(expr)
    fn = compile_python(expr)
    assert fn({"subtotal": 10, "items": 4}) == 2.5
    assert fn({"subtotal": 10, "items": 0}) is None
    assert infer_type(parse("items / 2"), TYPES) is FieldType.FLOAT


@pytest.mark.parametrize(
    ("text", "row", "expected"),
    [
        ("items > 1", {"items": None}, None),
        ("vip and items > 1", {"vip": False, "items": None}, False),
        ("vip or items > 1", {"vip": True, "items": None}, True),
        ("vip or items > 1", {"vip": False, "items": None}, None),
        ("not vip", {"vip": None}, None),
        ("coalesce(subtotal, 1.5)", {"subtotal": None}, 1.5),
        ("-items + 3", {"items": 1}, 2),
    ],
)
def test_null_semantics(text, row, expected):
    assert compile_python(parse(text))(row) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("items >", "unexpected end"),
        ("items $ 2", "unexpected character"),
        ("a < b < c", "after a complete expression"),
        ("sqrt(items)", "unknown function"),
        ("abs(items, 2)", "takes 1"),
        ("(items", r"expected '\)', found 'the end'"),
    ],
)
def test_syntax_errors(text, message):
    with pytest.raises(ExpressionError, match=message):
        parse(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nope > 1", "unknown column 'nope'"),
        ("zone_id + 1", "needs numbers"),
        ("zone_id > 1", "cannot compare"),
        ("items and vip", "needs booleans"),
        ("not items", "needs a boolean"),
    ],
)
def test_type_errors(text, message):
    with pytest.raises(ExpressionError, match=message):
        infer_type(parse(text), TYPES)


def test_types():
    assert infer_type(parse("items * 2"), TYPES) is FieldType.INT
    assert infer_type(parse("items * 2.0"), TYPES) is FieldType.FLOAT
    assert infer_type(parse("zone_id == 'z'"), TYPES) is FieldType.BOOL
