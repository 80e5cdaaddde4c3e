"""The aggregation objects: empty values, types, the null rule, last's tie-break, and that
partial states merge: merging the partials of any split of the values (in any grouping and
order) gives the partial of all of them, stddev included on adversarial data."""

from __future__ import annotations

import math
import random
from fractions import Fraction
from typing import Any

import pytest

from features.aggregations import AGGREGATIONS, AggregationFunction, Aggregator
from features.definitions import _NEEDS_NUMBER, empty_value
from features.schema import FieldType

Agg = AggregationFunction
NUMERIC = [f for f, a in AGGREGATIONS.items() if a.needs_number]


def same(a: Any, b: Any, rel: float = 1e-12) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)
    return type(a) is type(b) and a == b


def random_pairs(rng: random.Random, n: int, offset: float = 0.0) -> list[tuple[int, Any]]:
    """(t, value) with repeated times and values, some nulls, in no particular order."""
    pairs: list[tuple[int, Any]] = []
    for _ in range(n):
        value = None if rng.random() < 0.1 else offset + rng.choice([rng.random(), 2.5, -3.0])
        pairs.append((rng.randrange(50), value))
    return pairs


def merged_split(
    aggregator: Aggregator[Any], pairs: list[tuple[int, Any]], rng: random.Random
) -> Any:
    """Partials of a random split, merged in random groupings and order."""
    cuts = sorted(rng.sample(range(1, len(pairs)), rng.randrange(1, min(8, len(pairs)))))
    parts = [pairs[lo:hi] for lo, hi in zip([0, *cuts], [*cuts, len(pairs)], strict=True)]
    states = [s for s in (aggregator.of(p) for p in parts) if s is not None]
    rng.shuffle(states)
    while len(states) > 1:  # merge random neighbours: every grouping is a tree of merges
        i = rng.randrange(len(states) - 1)
        states[i : i + 2] = [aggregator.merge(states[i], states[i + 1])]
    return states[0] if states else None


def exact_stddev(values: list[float]) -> float:
    exact = [Fraction(v) for v in values]
    mean = sum(exact) / len(exact)
    return math.sqrt(sum((v - mean) ** 2 for v in exact) / (len(exact) - 1))


def test_registry_covers_every_function_and_definitions_read_it():
    assert set(AGGREGATIONS) == set(AggregationFunction)
    assert all(a.function is f for f, a in AGGREGATIONS.items())
    assert set(NUMERIC) == {Agg.SUM, Agg.MEAN, Agg.MIN, Agg.MAX, Agg.STDDEV} == _NEEDS_NUMBER
    assert [f for f, a in AGGREGATIONS.items() if not a.reads_column] == [Agg.COUNT]


def test_empty_windows_rule():
    """count and count_distinct 0, sum 0.0, everything else null: result() of no state."""
    want = {Agg.COUNT: 0, Agg.COUNT_DISTINCT: 0, Agg.SUM: 0.0}
    for function, aggregator in AGGREGATIONS.items():
        expected = want.get(function)
        assert same(aggregator.result(None), expected), function
        assert same(aggregator.empty, expected), function
        assert same(empty_value(function), expected), function
        # A window whose values are all null is empty too (count still counts its events).
        if aggregator.reads_column:
            assert aggregator.of([(1, None), (2, None)]) is None
            assert aggregator.merge_all([]) is None
    assert AGGREGATIONS[Agg.COUNT].result(AGGREGATIONS[Agg.COUNT].of([(1, None)])) == 1


@pytest.mark.parametrize("column", [FieldType.INT, FieldType.FLOAT, FieldType.STRING])
def test_output_types_and_result_types(column: FieldType):
    types = {f: a.output_type(column) for f, a in AGGREGATIONS.items()}
    assert types[Agg.COUNT] is FieldType.INT
    assert types[Agg.COUNT_DISTINCT] is FieldType.INT
    assert types[Agg.LAST] is column
    for function in NUMERIC:
        assert types[function] is FieldType.FLOAT
    samples: dict[FieldType, list[Any]] = {FieldType.INT: [3, 5, 5], FieldType.FLOAT: [3.0, 5.5]}
    sample = samples.get(column, ["a", "b"])
    python = {FieldType.INT: int, FieldType.FLOAT: float, FieldType.STRING: str}
    for function, aggregator in AGGREGATIONS.items():
        if aggregator.needs_number and column is FieldType.STRING:
            continue
        value = aggregator.result(aggregator.of(enumerate(sample)))
        assert isinstance(value, python[types[function]]), (function, value)
    with pytest.raises(ValueError, match="type of its column"):
        AGGREGATIONS[Agg.LAST].output_type(None)


def test_hand_values():
    pairs = [(1, 2.0), (2, 4.0), (3, None), (3, 9.0)]
    got = {f: a.result(a.of(pairs)) for f, a in AGGREGATIONS.items()}
    assert got == {
        Agg.COUNT: 4,
        Agg.SUM: 15.0,
        Agg.MEAN: 5.0,
        Agg.MIN: 2.0,
        Agg.MAX: 9.0,
        Agg.LAST: 9.0,
        Agg.STDDEV: pytest.approx(math.sqrt(13.0)),
        Agg.COUNT_DISTINCT: 3,
    }
    stddev = AGGREGATIONS[Agg.STDDEV]
    assert stddev.result(stddev.of([(1, 7.0)])) is None  # sample stddev: null below two
    assert stddev.result(stddev.of([(1, 0.1)] * 5)) == 0.0  # equal values: exactly 0


def test_last_ties_go_to_the_greatest_value_in_any_order_and_grouping():
    last = AGGREGATIONS[Agg.LAST]
    pairs = [(5, "b"), (5, "c"), (5, "a"), (4, "z"), (1, "zz")]
    rng = random.Random(3)
    for _ in range(20):
        rng.shuffle(pairs)
        assert last.result(last.of(pairs)) == "c"
        assert last.result(merged_split(last, pairs, rng)) == "c"
    assert last.result(last.of([(1, 3), (2, 1), (2, 2)])) == 2
    assert last.result(last.of([(7, False), (7, True)])) is True


@pytest.mark.parametrize("function", list(AggregationFunction))
@pytest.mark.parametrize("offset", [0.0, 1e9])
def test_merge_of_split_partials_equals_partial_of_the_whole(function: Agg, offset: float):
    aggregator = AGGREGATIONS[function]
    rng = random.Random(f"{function}-{offset}")
    for _ in range(200):
        pairs = random_pairs(rng, rng.randrange(2, 60), offset)
        whole = aggregator.result(aggregator.of(pairs))
        split = aggregator.result(merged_split(aggregator, pairs, rng))
        assert (whole is None) == (split is None)
        if whole is not None:
            assert same(split, whole, rel=1e-9), (pairs, split, whole)


def test_merge_is_associative_and_commutative_on_results():
    rng = random.Random(11)
    for function, aggregator in AGGREGATIONS.items():
        for _ in range(50):
            a, b, c = (aggregator.of([*random_pairs(rng, 5), (9, 1.0)]) for _ in "abc")
            left = aggregator.merge(aggregator.merge(a, b), c)
            right = aggregator.merge(a, aggregator.merge(b, c))
            swapped = aggregator.merge(c, aggregator.merge(b, a))
            for other in (right, swapped):
                assert same(aggregator.result(left), aggregator.result(other)), function


@pytest.mark.parametrize("offset", [1e9, -1e9, 1e12, 3.7e15])
@pytest.mark.parametrize("spread", [1e-3, 1.0, 1e3])
def test_stddev_is_exact_with_a_large_mean_and_small_spread(offset: float, spread: float):
    """Sums of squares, or means held as one float, lose every digit here; the state keeps
    the mean as shift + offset, so folding and merging agree with exact arithmetic."""
    stddev = AGGREGATIONS[Agg.STDDEV]
    rng = random.Random(f"{offset}-{spread}")
    for _ in range(30):
        values = [offset + rng.random() * spread for _ in range(rng.randrange(2, 300))]
        if len(set(values)) < 2:
            continue  # the offset's ulp ate the spread: all values equal
        exact = exact_stddev(values)
        pairs = list(enumerate(values))
        assert math.isclose(stddev.result(stddev.of(pairs)), exact, rel_tol=1e-9)
        assert math.isclose(stddev.result(merged_split(stddev, pairs, rng)), exact, rel_tol=1e-9)


def test_sum_and_mean_are_compensated():
    total = AGGREGATIONS[Agg.SUM]
    mean = AGGREGATIONS[Agg.MEAN]
    values = [1e16, 1.0, -1e16, 1.0] * 10  # a naive float sum gives 0.0 or 40.0
    pairs = list(enumerate(values))
    assert total.result(total.of(pairs)) == math.fsum(values) == 20.0
    assert mean.result(mean.of(pairs)) == 0.5
    assert total.result(total.of([(1, math.inf), (2, 1.0)])) == math.inf


def test_merge_does_not_change_its_arguments():
    distinct = AGGREGATIONS[Agg.COUNT_DISTINCT]
    a, b = distinct.of([(1, "x"), (2, "y")]), distinct.of([(3, "y"), (4, "z")])
    assert distinct.result(distinct.merge(a, b)) == 3
    assert distinct.result(distinct.merge_all([a, b])) == 3
    assert (a, b) == ({"x", "y"}, {"y", "z"})
