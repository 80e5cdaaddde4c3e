"""A small expression language for row filters and derived columns, compiled to both engines.

Definitions may not carry arbitrary Python (an engine could not run it). Instead they carry
expressions like ``items >= 2 and zone_id != 'z-00'`` or ``subtotal / items``, parsed here into
a typed AST that renders to Spark SQL and Flink SQL (``to_sql``; ``to_flink_sql`` is the
stream's tile query's exact rendering) and evaluates in the reference
implementation. Semantics are SQL's: null propagates, a filter keeps rows where it is true,
``/`` is float division and dividing by zero gives null (rendered the same way for both engines).

Functions: ``abs(x)``, ``coalesce(x, y)`` and ``hour(t)``, the UTC hour (0-23) of a timestamp
column (epoch milliseconds in Python; Spark sessions run in UTC, see batch/session.py), e.g. the
hour of day of a label time in a Labels declaration (features/labels.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from features.schema import FieldType

Row = Mapping[str, Any]
_NUMERIC = (FieldType.INT, FieldType.FLOAT)


class ExpressionError(ValueError):
    """Raised with a message naming the problem; callers wrap it with the definition's name."""


@dataclass(frozen=True)
class Literal:
    value: str | int | float | bool


@dataclass(frozen=True)
class Column:
    name: str


@dataclass(frozen=True)
class Unary:
    op: str  # "-" or "not"
    operand: Expr


@dataclass(frozen=True)
class Binary:
    op: str  # + - * / == != < <= > >= and or
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Call:
    function: str  # abs, coalesce, hour
    args: tuple[Expr, ...]


Expr = Literal | Column | Unary | Binary | Call

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+\.\d*|\.\d+|\d+)|(?P<str>'(?:[^']|'')*')|(?P<id>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>==|!=|<=|>=|[-+*/<>(),]))"
)
_KEYWORDS = {"and", "or", "not", "true", "false"}
_FUNCTIONS = {"abs": 1, "coalesce": 2, "hour": 1}
_HOUR_MS = 3_600_000


def parse(text: str) -> Expr:
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise ExpressionError(f"unexpected character at {pos}: {text[pos : pos + 10]!r}")
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    parser = _Parser(tokens)
    expr = parser.expression()
    if parser.peek() is not None:
        raise ExpressionError(f"unexpected {parser.peek()!r} after a complete expression")
    return expr


class _Parser:
    """Recursive descent; precedence from low to high: or, and, not, comparison, +-, */, unary."""

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i][1] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        if self.i >= len(self.tokens):
            raise ExpressionError("unexpected end of expression")
        self.i += 1
        return self.tokens[self.i - 1]

    def expect(self, value: str) -> None:
        found = self.peek()
        if found != value:
            raise ExpressionError(f"expected {value!r}, found {found or 'the end'!r}")
        self.take()

    def expression(self) -> Expr:
        return self.binary_level(0)

    _LEVELS: tuple[tuple[str, ...], ...] = (
        ("or",),
        ("and",),
        ("==", "!=", "<", "<=", ">", ">="),
        ("+", "-"),
        ("*", "/"),
    )

    def binary_level(self, level: int) -> Expr:
        if level == 2:
            return self.negation()
        if level == len(self._LEVELS):
            return self.unary()
        left = self.binary_level(level + 1)
        while (op := self.peek()) in self._LEVELS[level]:
            self.take()
            left = Binary(str(op), left, self.binary_level(level + 1))
        return left

    def negation(self) -> Expr:
        # 'not' binds looser than comparisons, and comparisons do not chain (a < b < c).
        if self.peek() == "not":
            self.take()
            return Unary("not", self.negation())
        left = self.binary_level(3)
        if (op := self.peek()) in self._LEVELS[2]:
            self.take()
            return Binary(str(op), left, self.binary_level(3))
        return left

    def unary(self) -> Expr:
        if self.peek() == "-":
            self.take()
            return Unary("-", self.unary())
        return self.atom()

    def atom(self) -> Expr:
        kind, value = self.take()
        if kind == "num":
            return Literal(float(value) if "." in value else int(value))
        if kind == "str":
            return Literal(value[1:-1].replace("''", "'"))
        if kind == "id":
            if value in ("true", "false"):
                return Literal(value == "true")
            if value in _KEYWORDS:
                raise ExpressionError(f"unexpected keyword {value!r}")
            if self.peek() == "(":
                self.take()
                args = [self.expression()]
                while self.peek() == ",":
                    self.take()
                    args.append(self.expression())
                self.expect(")")
                if value not in _FUNCTIONS:
                    known = ", ".join(_FUNCTIONS)
                    raise ExpressionError(f"unknown function {value!r} (known: {known})")
                if len(args) != _FUNCTIONS[value]:
                    raise ExpressionError(f"{value}() takes {_FUNCTIONS[value]} argument(s)")
                return Call(value, tuple(args))
            return Column(value)
        if value == "(":
            inner = self.expression()
            self.expect(")")
            return inner
        raise ExpressionError(f"unexpected {value!r}")


def infer_type(expr: Expr, columns: Mapping[str, FieldType]) -> FieldType:
    """The expression's type given the columns' types; raises ExpressionError when ill-typed."""
    if isinstance(expr, Literal):
        if isinstance(expr.value, bool):
            return FieldType.BOOL
        if isinstance(expr.value, int):
            return FieldType.INT
        return FieldType.FLOAT if isinstance(expr.value, float) else FieldType.STRING
    if isinstance(expr, Column):
        if expr.name not in columns:
            raise ExpressionError(f"unknown column {expr.name!r}")
        return columns[expr.name]
    if isinstance(expr, Unary):
        inner = infer_type(expr.operand, columns)
        if expr.op == "not":
            if inner is not FieldType.BOOL:
                raise ExpressionError("'not' needs a boolean")
            return FieldType.BOOL
        if inner not in _NUMERIC:
            raise ExpressionError("unary '-' needs a number")
        return inner
    if isinstance(expr, Call):
        types = [infer_type(a, columns) for a in expr.args]
        if expr.function == "hour":
            if types[0] is not FieldType.TIMESTAMP:
                raise ExpressionError("hour() needs a timestamp")
            return FieldType.INT
        if expr.function == "abs":
            if types[0] not in _NUMERIC:
                raise ExpressionError("abs() needs a number")
            return types[0]
        if types[0] != types[1] and not (types[0] in _NUMERIC and types[1] in _NUMERIC):
            raise ExpressionError("coalesce() needs two values of one type")
        return FieldType.FLOAT if FieldType.FLOAT in types else types[0]
    left, right = infer_type(expr.left, columns), infer_type(expr.right, columns)
    if expr.op in ("and", "or"):
        if left is not FieldType.BOOL or right is not FieldType.BOOL:
            raise ExpressionError(f"'{expr.op}' needs booleans")
        return FieldType.BOOL
    if expr.op in ("+", "-", "*", "/"):
        if left not in _NUMERIC or right not in _NUMERIC:
            raise ExpressionError(f"'{expr.op}' needs numbers")
        if expr.op == "/" or FieldType.FLOAT in (left, right):
            return FieldType.FLOAT
        return FieldType.INT
    comparable = left == right or (left in _NUMERIC and right in _NUMERIC)
    if not comparable:
        raise ExpressionError(f"cannot compare {left} with {right}")
    return FieldType.BOOL


_SQL_OPS = {"==": "=", "!=": "<>", "and": "AND", "or": "OR"}


def to_sql(expr: Expr) -> str:
    """Render for Spark SQL and Flink SQL alike (both quote identifiers with backticks)."""
    if isinstance(expr, Literal):
        if isinstance(expr.value, bool):
            return "TRUE" if expr.value else "FALSE"
        if isinstance(expr.value, str):
            return "'" + expr.value.replace("'", "''") + "'"
        if isinstance(expr.value, float):
            return f"CAST({expr.value!r} AS DOUBLE)"
        return str(expr.value)
    if isinstance(expr, Column):
        return f"`{expr.name}`"
    if isinstance(expr, Unary):
        return f"(NOT {to_sql(expr.operand)})" if expr.op == "not" else f"(-{to_sql(expr.operand)})"
    if isinstance(expr, Call):
        args = ", ".join(to_sql(a) for a in expr.args)
        return f"{expr.function.upper()}({args})"
    left, right = to_sql(expr.left), to_sql(expr.right)
    if expr.op == "/":
        # Spark 4 (ANSI) raises on x/0 and Flink differs by type: spell out "null on zero".
        return f"(CASE WHEN {right} = 0 THEN NULL ELSE CAST({left} AS DOUBLE) / {right} END)"
    return f"({left} {_SQL_OPS.get(expr.op, expr.op)} {right})"


def to_flink_sql(expr: Expr) -> str:
    """Render for Flink SQL with the reference's semantics (``compile_python``), exactly.

    Columns are what the stream's tile query decodes (streaming/tiles.py): INT and TIMESTAMP as
    BIGINT (timestamps in epoch milliseconds), FLOAT as DOUBLE, BOOL as BOOLEAN, STRING as
    STRING. Where ``to_sql`` (shared with Spark) and Flink differ from the reference:
      - ``hour(t)`` of epoch milliseconds: Python's floor division and non-negative modulo
        (Flink's integer ``/`` truncates and MOD takes the dividend's sign);
      - ``x / 0`` is a typed null, so that the CASE keeps the DOUBLE type in every position.
    Null propagation, three-valued and/or/not and ``coalesce`` are SQL's, as in the reference.
    """
    if isinstance(expr, Literal | Column):
        return to_sql(expr)
    if isinstance(expr, Unary):
        inner = to_flink_sql(expr.operand)
        return f"(NOT {inner})" if expr.op == "not" else f"(-{inner})"
    if isinstance(expr, Call):
        args = [to_flink_sql(a) for a in expr.args]
        if expr.function == "hour":
            hours = f"CAST(FLOOR(CAST({args[0]} AS DOUBLE) / {_HOUR_MS}) AS BIGINT)"
            return f"MOD(MOD({hours}, 24) + 24, 24)"
        return f"{expr.function.upper()}({', '.join(args)})"
    left, right = to_flink_sql(expr.left), to_flink_sql(expr.right)
    if expr.op == "/":
        return (
            f"(CASE WHEN {right} = 0 THEN CAST(NULL AS DOUBLE) "
            f"ELSE CAST({left} AS DOUBLE) / {right} END)"
        )
    return f"({left} {_SQL_OPS.get(expr.op, expr.op)} {right})"


def columns_of(expr: Expr) -> set[str]:
    """The names of the columns an expression reads."""
    if isinstance(expr, Column):
        return {expr.name}
    if isinstance(expr, Literal):
        return set()
    if isinstance(expr, Unary):
        return columns_of(expr.operand)
    if isinstance(expr, Call):
        return set().union(*(columns_of(a) for a in expr.args))
    return columns_of(expr.left) | columns_of(expr.right)


def compile_python(expr: Expr) -> Callable[[Row], Any]:
    """A function evaluating the expression on a row, with SQL null semantics."""
    if isinstance(expr, Literal):
        value = expr.value
        return lambda row: value
    if isinstance(expr, Column):
        name = expr.name
        return lambda row: row.get(name)
    if isinstance(expr, Unary):
        inner = compile_python(expr.operand)
        if expr.op == "not":
            return lambda row: None if (v := inner(row)) is None else not v
        return lambda row: None if (v := inner(row)) is None else -v
    if isinstance(expr, Call):
        args = [compile_python(a) for a in expr.args]
        if expr.function == "abs":
            return lambda row: None if (v := args[0](row)) is None else abs(v)
        if expr.function == "hour":
            return lambda row: None if (v := args[0](row)) is None else _hour(v)
        return lambda row: v if (v := args[0](row)) is not None else args[1](row)
    left, right = compile_python(expr.left), compile_python(expr.right)
    if expr.op == "and":
        return lambda row: _and(left(row), right(row))
    if expr.op == "or":
        return lambda row: _or(left(row), right(row))
    operator = _PY_OPS[expr.op]

    def binary(row: Row) -> Any:
        a, b = left(row), right(row)
        return None if a is None or b is None else operator(a, b)

    return binary


def _hour(value: Any) -> int:
    """UTC hour of epoch milliseconds (or of an aware datetime)."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).hour
    return int(value) // _HOUR_MS % 24


def _and(a: Any, b: Any) -> Any:
    if a is False or b is False:
        return False
    return None if a is None or b is None else True


def _or(a: Any, b: Any) -> Any:
    if a is True or b is True:
        return True
    return None if a is None or b is None else False


_PY_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: None if b == 0 else float(a) / b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}
