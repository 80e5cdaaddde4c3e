"""The tile engine's Java sums (streaming/java/sluice/ExactSum.java, Moments.java) depend only on
the values, not on their order nor on how partial states were grouped and merged.

Flink SQL's SUM(DOUBLE) rounds at every addition, in an order a window aggregate does not fix:
the same tile summed again after a restore could differ in its last bits, and a replayed row
then differ from the one emitted before the restore (test_fault_pipeline saw it). Here the same
values, shuffled differently per key, go through a two-phase aggregation (local partial
states merged by a global one, parallelism 2): every key must get the same state, equal to
the exact sum (as fractions) rounded once.
"""

from __future__ import annotations

import random
from fractions import Fraction
from pathlib import Path

import pytest

from streaming.tiles import decode_moments, decode_sum

pytestmark = [pytest.mark.integration, pytest.mark.flink]

# Cancellation (1e16 + 1 - 1e16), values without an exact binary form, a huge range of scales,
# a subnormal.
VALUES = [1e16, 1.0, -1e16, 0.1, 0.2, 0.3, 1e-300, 123456.789, -0.7, 1 / 3, 2.5e-8, 17.5, 5e-324]
VALUES *= 4
KEYS = 8


def test_exact_sum_and_moments_do_not_depend_on_order_or_merges(tmp_path: Path) -> None:
    from pyflink.table import DataTypes, EnvironmentSettings, TableEnvironment

    from streaming.udf import FUNCTIONS, udf_jar

    env = TableEnvironment.create(EnvironmentSettings.in_batch_mode())
    config = env.get_config()
    config.set("pipeline.jars", udf_jar(tmp_path).resolve().as_uri())
    config.set("parallelism.default", "2")
    config.set("table.optimizer.agg-phase-strategy", "TWO_PHASE")
    for function, java_class in FUNCTIONS.items():
        env.create_java_temporary_system_function(function, java_class)
    rng = random.Random(11)
    rows: list[tuple[str, float | None]] = []
    for k in range(KEYS):
        values: list[float | None] = [*VALUES, None]
        rng.shuffle(values)
        rows += [(f"k{k}", v) for v in values]
    rng.shuffle(rows)
    schema = DataTypes.ROW(
        [DataTypes.FIELD("k", DataTypes.STRING()), DataTypes.FIELD("x", DataTypes.DOUBLE())]
    )
    env.create_temporary_view("v", env.from_elements(rows, schema))
    query = "SELECT k, sluice_sum(x), sluice_moments(x), SUM(x) FROM v GROUP BY k"
    result = [tuple(r) for r in env.execute_sql(query).collect()]
    assert sorted(r[0] for r in result) == [f"k{k}" for k in range(KEYS)]

    exact = sum(map(Fraction, VALUES), Fraction(0))
    hi = float(exact)
    n = len(VALUES)
    mean = exact / n
    m2 = sum(((Fraction(v) - mean) ** 2 for v in VALUES), Fraction(0))
    for _, total_text, moments_text, _ in result:
        assert decode_sum(total_text) == (hi, float(exact - Fraction(hi)))
        count, c, d, got_m2 = decode_moments(moments_text)
        assert count == n
        # Each rounded once from the exact value (streaming/java/sluice/BinarySum.java).
        assert (c, d) == (float(mean), float(mean - Fraction(float(mean))))
        assert got_m2 == float(m2)
    # One state for every order and grouping (Flink's own SUM column is not compared: its
    # rounding follows the order, which is the point).
    assert len({(r[1], r[2]) for r in result}) == 1
    plain = {r[3] for r in result}
    print(f"exact sum {hi!r}; Flink SUM(DOUBLE) gave {len(plain)} different values: {plain}")
