"""Aggregation functions, one object each: the one definition of what an aggregation computes.

An ``Aggregator`` states, for its function:
- ``output_type``: the feature's type, given the type of the column it aggregates;
- ``empty``: its value over an empty window (the rule below);
- a mergeable partial state: ``partial(t, value)`` of one value, ``add(state, t, value)`` of
  one more, ``merge(a, b)`` of two disjoint sets of values, and ``result(state)``.
  ``merge(partial of A, partial of B)`` equals the partial of A and B together (floats: up to
  rounding, see each state), so an engine may keep one state per slide bucket ("tile") and
  merge the tiles of a window in any grouping and order.

Empty windows (stated here and only here): count and count_distinct are 0, sum is 0.0, and
mean, min, max, last and stddev are null. ``result(None)`` is that value: ``None`` is the
state of no values, since a partial state always holds at least one.

Nulls: a null value is skipped (it makes no partial), except by count, which counts events
and reads no column (``reads_column``); ``fold`` applies this rule for every caller.

Who reads these objects: ``features.definitions`` (the function enum, which functions need a
column or a number, output types, ``empty_value``), the reference (``features.reference``),
and the stream window engine (``streaming.compile`` and ``streaming.windows``). Spark cannot
run Python per value, so ``batch/compile.py`` maps each function to Spark columns itself and
is checked against the reference by the parity tests.

Adding an aggregation touches two files: this one (an ``AggregationFunction`` member, an
``Aggregator`` subclass, its ``AGGREGATIONS`` entry) and ``batch/compile.py`` (its Spark
partial, merge and result columns in ``_BUILDERS``). Everything else follows, and compiling
a view that uses a function Spark has no mapping for raises UnsupportedAggregationError. The
stream engine "tiles-java" assembles windows in the JVM and needs the merge and result there
too (streaming/java/sluice/Aggregation.java, held equal to these objects by
tests/integration/test_java_windows.py).

Pure Python, no dependencies: engines import it, and states are small tuples (a set for
count_distinct) so that they pickle cheaply into Flink state.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from enum import StrEnum
from functools import reduce
from typing import Any, Generic, TypeVar

from features.schema import FieldType

S = TypeVar("S")


class AggregationFunction(StrEnum):
    COUNT = "count"
    SUM = "sum"
    MEAN = "mean"
    MIN = "min"
    MAX = "max"
    LAST = "last"
    STDDEV = "stddev"
    COUNT_DISTINCT = "count_distinct"


class Aggregator(ABC, Generic[S]):
    """One aggregation function: its type, its empty value and its mergeable partial state.

    ``add`` may update ``state`` in place and returns the new state; ``merge`` and
    ``merge_all`` never change their arguments (engines merge a window's tiles and keep them).
    """

    function: AggregationFunction
    empty: Any = None  # the value over an empty window (module docstring)
    reads_column = True  # False: counts events, nulls included, and needs no column
    needs_number = False  # only int and float columns

    def output_type(self, column_type: FieldType | None) -> FieldType:
        del column_type  # most aggregations give a float whatever the column type
        return FieldType.FLOAT

    @abstractmethod
    def partial(self, t: int, value: Any) -> S:
        """The state of one (non-null, unless not ``reads_column``) value at event time t."""

    @abstractmethod
    def add(self, state: S, t: int, value: Any) -> S:
        """``state`` with one more value."""

    @abstractmethod
    def merge(self, a: S, b: S) -> S:
        """The state of the values of ``a`` and of ``b`` together."""

    @abstractmethod
    def finish(self, state: S) -> Any:
        """The feature value of a state (at least one value)."""

    def result(self, state: S | None) -> Any:
        """The feature value; ``None`` (no values) gives the empty value."""
        return self.empty if state is None else self.finish(state)

    def fold(self, state: S | None, t: int, value: Any) -> S | None:
        """``state`` (or no state) plus one event's value, skipping nulls as the rule says."""
        if value is None and self.reads_column:
            return state
        return self.partial(t, value) if state is None else self.add(state, t, value)

    def merge_all(self, states: Iterable[S]) -> S | None:
        """All states merged (None when there are none)."""
        iterator = iter(states)
        first = next(iterator, None)
        return first if first is None else reduce(self.merge, iterator, first)

    def of(self, pairs: Iterable[tuple[int, Any]]) -> S | None:
        """The state of (event time, value) pairs."""
        state: S | None = None
        for t, value in pairs:
            state = self.fold(state, t, value)
        return state


class Count(Aggregator[int]):
    """Number of events, null values included."""

    function = AggregationFunction.COUNT
    empty = 0
    reads_column = False

    def output_type(self, column_type: FieldType | None) -> FieldType:
        return FieldType.INT

    def partial(self, t: int, value: Any) -> int:
        return 1

    def add(self, state: int, t: int, value: Any) -> int:
        return state + 1

    def merge(self, a: int, b: int) -> int:
        return a + b

    def finish(self, state: int) -> int:
        return state


def _two_sum(a: float, b: float) -> tuple[float, float]:
    """a + b rounded, and the rounding error (Neumaier's branch on the larger magnitude)."""
    total = a + b
    error = (a - total) + b if abs(a) >= abs(b) else (b - total) + a
    return total, error


# A compensated sum (total, error): Neumaier summation, close to math.fsum at the cost of two
# floats, and mergeable (unlike fsum's list of partials, which grows with cancellation).
Compensated = tuple[float, float]


def _add_compensated(a: Compensated, b: Compensated) -> Compensated:
    total, error = _two_sum(a[0], b[0])
    return total, a[1] + b[1] + error


def _compensated_value(state: Compensated) -> float:
    total, error = state
    # An infinite total makes the error nan; the total alone is then the answer.
    return total + error if math.isfinite(total) else total


class Sum(Aggregator[Compensated]):
    function = AggregationFunction.SUM
    empty = 0.0
    needs_number = True

    def partial(self, t: int, value: Any) -> Compensated:
        return float(value), 0.0

    def add(self, state: Compensated, t: int, value: Any) -> Compensated:
        return _add_compensated(state, (float(value), 0.0))

    def merge(self, a: Compensated, b: Compensated) -> Compensated:
        return _add_compensated(a, b)

    def finish(self, state: Compensated) -> float:
        return _compensated_value(state)


class Mean(Aggregator[tuple[int, Compensated]]):
    """Arithmetic mean: (count, compensated sum)."""

    function = AggregationFunction.MEAN
    needs_number = True

    def partial(self, t: int, value: Any) -> tuple[int, Compensated]:
        return 1, (float(value), 0.0)

    def add(self, state: tuple[int, Compensated], t: int, value: Any) -> tuple[int, Compensated]:
        return state[0] + 1, _add_compensated(state[1], (float(value), 0.0))

    def merge(
        self, a: tuple[int, Compensated], b: tuple[int, Compensated]
    ) -> tuple[int, Compensated]:
        return a[0] + b[0], _add_compensated(a[1], b[1])

    def finish(self, state: tuple[int, Compensated]) -> float:
        return _compensated_value(state[1]) / state[0]


class Min(Aggregator[float]):
    function = AggregationFunction.MIN
    needs_number = True

    def partial(self, t: int, value: Any) -> float:
        return float(value)

    def add(self, state: float, t: int, value: Any) -> float:
        return min(state, float(value))

    def merge(self, a: float, b: float) -> float:
        return min(a, b)

    def finish(self, state: float) -> float:
        return state


class Max(Aggregator[float]):
    function = AggregationFunction.MAX
    needs_number = True

    def partial(self, t: int, value: Any) -> float:
        return float(value)

    def add(self, state: float, t: int, value: Any) -> float:
        return max(state, float(value))

    def merge(self, a: float, b: float) -> float:
        return max(a, b)

    def finish(self, state: float) -> float:
        return state


class Last(Aggregator[tuple[int, Any]]):
    """The value of the event with the greatest event time; ties go to the greatest value, so
    that every engine picks the same one whatever the arrival order. State: (t, value)."""

    function = AggregationFunction.LAST

    def output_type(self, column_type: FieldType | None) -> FieldType:
        if column_type is None:
            raise ValueError("last needs the type of its column")
        return column_type

    def partial(self, t: int, value: Any) -> tuple[int, Any]:
        return t, value

    def add(self, state: tuple[int, Any], t: int, value: Any) -> tuple[int, Any]:
        return max(state, (t, value))

    def merge(self, a: tuple[int, Any], b: tuple[int, Any]) -> tuple[int, Any]:
        return max(a, b)

    def finish(self, state: tuple[int, Any]) -> Any:
        return state[1]


# (count, shift, offset, M2): count, the mean as shift + offset, and the sum of squared
# deviations from the mean.
Moments = tuple[int, float, float, float]


class Stddev(Aggregator[Moments]):
    """Sample standard deviation, null below two values.

    State (n, c, d, M2): Welford's running mean and M2, merged with Chan et al.'s parallel
    formula. The mean is held as c + d, with c one of the values (the first) and d the mean's
    offset from it: a mean of 1e9 + 0.001 as one float keeps only about 1e-7 of precision,
    which is no longer small against a spread of 0.001, and Chan's merge squares the
    difference of two such means. x - c is exact for values close to c (Sterbenz), and every
    other quantity is on the scale of the spread, not of the values. batch/compile.py's Spark
    tiles keep the same four fields.
    """

    function = AggregationFunction.STDDEV
    needs_number = True

    def partial(self, t: int, value: Any) -> Moments:
        return 1, float(value), 0.0, 0.0

    def add(self, state: Moments, t: int, value: Any) -> Moments:
        n, shift, offset, m2 = state
        n += 1
        y = float(value) - shift
        delta = y - offset
        offset += delta / n
        return n, shift, offset, m2 + delta * (y - offset)

    def merge(self, a: Moments, b: Moments) -> Moments:
        na, shift, offset_a, m2_a = a
        nb, shift_b, offset_b, m2_b = b
        n = na + nb
        # b's mean minus a's mean; shift_b - shift is exact when the two are close.
        delta = (shift_b - shift) + (offset_b - offset_a)
        return n, shift, offset_a + delta * nb / n, m2_a + m2_b + delta * delta * (na * nb / n)

    def finish(self, state: Moments) -> float | None:
        n, _, _, m2 = state
        # M2 is a sum of squares; rounding must not make it (and the root) negative.
        return math.sqrt(max(m2, 0.0) / (n - 1)) if n >= 2 else None


class CountDistinct(Aggregator[set[Any]]):
    """Number of distinct non-null values. State: the set of values (updated in place)."""

    function = AggregationFunction.COUNT_DISTINCT
    empty = 0

    def output_type(self, column_type: FieldType | None) -> FieldType:
        return FieldType.INT

    def partial(self, t: int, value: Any) -> set[Any]:
        return {value}

    def add(self, state: set[Any], t: int, value: Any) -> set[Any]:
        state.add(value)
        return state

    def merge(self, a: set[Any], b: set[Any]) -> set[Any]:
        return a | b

    def merge_all(self, states: Iterable[set[Any]]) -> set[Any] | None:
        # One union of all tiles' sets, not one new set per pairwise merge.
        listed = list(states)
        return set().union(*listed) if listed else None

    def finish(self, state: set[Any]) -> int:
        return len(state)


AGGREGATIONS: dict[AggregationFunction, Aggregator[Any]] = {
    a.function: a for a in (Count(), Sum(), Mean(), Min(), Max(), Last(), Stddev(), CountDistinct())
}
