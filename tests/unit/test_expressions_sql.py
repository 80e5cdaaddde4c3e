"""features.expressions.to_flink_sql against the reference evaluator (compile_python), on the
same rows, evaluated by Flink itself (a local batch TableEnvironment: one JVM for the module).

Every expression is evaluated over rows with nulls, zeros, negative numbers, ties and strings
that need quoting; a value that differs (floats: beyond 1e-12 relative) fails with the
expression, the row and both values.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from features.expressions import columns_of, compile_python, infer_type, parse, to_flink_sql
from features.schema import FieldType

pytestmark = [pytest.mark.flink, pytest.mark.slow]

COLUMNS: dict[str, FieldType] = {
    "a": FieldType.INT,
    "b": FieldType.INT,
    "x": FieldType.FLOAT,
    "y": FieldType.FLOAT,
    "s": FieldType.STRING,
    "f": FieldType.BOOL,
    "t": FieldType.TIMESTAMP,
}
HOUR = 3_600_000
ROWS: list[dict[str, Any]] = [
    {"a": 3, "b": 2, "x": 1.5, "y": -0.25, "s": "z-00", "f": True, "t": 5 * HOUR + 1},
    {"a": -7, "b": 2, "x": 0.0, "y": 3.0, "s": "it's", "f": False, "t": 23 * HOUR + HOUR - 1},
    {"a": 0, "b": 0, "x": -2.5, "y": 0.0, "s": "", "f": None, "t": -1},
    {"a": None, "b": 5, "x": None, "y": 1e300, "s": None, "f": True, "t": None},
    {"a": 10, "b": None, "x": 7.0, "y": None, "s": "z03", "f": None, "t": 1_767_268_800_000},
    {"a": 2, "b": 3, "x": 1e-9, "y": 1e9 + 0.001, "s": "Z", "f": False, "t": 0},
]
EXPRESSIONS = [
    "a + b",
    "a - b * 2",
    "-a",
    "-x + y",
    "a / b",
    "x / y",
    "a / 0",
    "(a + x) / (b - 2)",
    "abs(a)",
    "abs(x - y)",
    "coalesce(a, b)",
    "coalesce(x, a)",
    "coalesce(s, 'none')",
    "hour(t)",
    "hour(t) >= 5 and hour(t) < 23",
    "a >= 2 and s != 'z03'",
    "a >= 2 or s == 'z03'",
    "not f",
    "not (a > b)",
    "f and a > 0",
    "f or x > 0.0",
    "s < 'z'",
    "s == 'it''s'",
    "a == x",
    "x > 1.5",
    "y / a > 0.1",
    "a * 3 + 2 >= b",
    "true",
    "2.5 * a",
]


@pytest.fixture(scope="module")
def flink_env() -> Any:
    pytest.importorskip("pyflink")
    from pyflink.table import DataTypes, EnvironmentSettings, TableEnvironment

    env = TableEnvironment.create(EnvironmentSettings.in_batch_mode())
    env.get_config().set("parallelism.default", "1")
    flink_types = {
        FieldType.INT: DataTypes.BIGINT(),
        FieldType.TIMESTAMP: DataTypes.BIGINT(),
        FieldType.FLOAT: DataTypes.DOUBLE(),
        FieldType.STRING: DataTypes.STRING(),
        FieldType.BOOL: DataTypes.BOOLEAN(),
    }
    schema = DataTypes.ROW([DataTypes.FIELD(n, flink_types[t]) for n, t in COLUMNS.items()])
    indexed = [(i, *(r[n] for n in COLUMNS)) for i, r in enumerate(ROWS)]
    schema = DataTypes.ROW([DataTypes.FIELD("i", DataTypes.INT()), *schema.fields])
    env.create_temporary_view("input", env.from_elements(indexed, schema))
    return env


def same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) or a == b
    return bool(a == b)


def test_every_expression_is_well_typed() -> None:
    for text in EXPRESSIONS:
        infer_type(parse(text), COLUMNS)


def test_flink_sql_gives_the_reference_values(flink_env: Any) -> None:
    selected = ", ".join(f"{to_flink_sql(parse(e))} AS e{k}" for k, e in enumerate(EXPRESSIONS))
    with flink_env.sql_query(f"SELECT i, {selected} FROM input").execute().collect() as rows:
        got = {row[0]: tuple(row)[1:] for row in rows}
    assert sorted(got) == list(range(len(ROWS)))
    differences = []
    for k, text in enumerate(EXPRESSIONS):
        reference = compile_python(parse(text))
        for i, row in enumerate(ROWS):
            want = reference(row)
            if not same(got[i][k], want):
                differences.append(f"{text!r} on row {i}: flink {got[i][k]!r}, reference {want!r}")
    assert differences == []


def test_hour_differs_from_truncating_division_on_negative_times() -> None:
    # The reason hour() has its own rendering: -1 ms is 23:59:59.999 of the day before.
    assert compile_python(parse("hour(t)"))({"t": -1}) == 23
    assert "FLOOR" in to_flink_sql(parse("hour(t)"))


def test_columns_of_names_every_column_read() -> None:
    assert columns_of(parse("coalesce(a, b) / abs(x) > 1.0 and not f")) == {"a", "b", "x", "f"}
    assert columns_of(parse("1 + 2")) == set()
