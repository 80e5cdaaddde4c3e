"""bench.stream's measurement: the order of the rounds and their medians (no JVM)."""

from __future__ import annotations

import pytest

from bench.stream import Measured, in_rounds


def test_every_other_round_runs_the_engines_in_reverse_order() -> None:
    assert in_rounds(["a", "b", "c"], 1) == ["a", "b", "c"]
    assert in_rounds(["a", "b", "c"], 2) == ["a", "b", "c", "c", "b", "a"]
    order = in_rounds(["a", "b", "c"], 3)
    assert order == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert all(order.count(e) == 3 for e in "abc")


def test_the_rate_and_cpu_are_medians_of_the_rounds() -> None:
    found = Measured()
    # Round 1: small, small, full; then round 2, round 3 (events, CPU s, Python's, JIT's).
    for small_cpu, full_cpu, rate in ((10.0, 30.0, 100.0), (12.0, 22.0, 300.0), (9.0, 24.0, 200.0)):
        found.runs += [(500, small_cpu, 1.0, 0.5), (500, small_cpu, 1.0, 0.5)]
        found.runs.append((1000, full_cpu, 2.0, 0.5))
        found.add_round(rate, full_cpu)
    assert found.rate == 200.0
    assert found.seconds == 24.0
    # Marginal CPU per event: (30-10)/500, (22-12)/500, (24-9)/500 s -> the median, 15/500.
    assert found.cpu_us == pytest.approx(15 / 500 * 1e6)
    assert found.python_us == pytest.approx(1 / 500 * 1e6)
    assert found.jit_us == pytest.approx(0.0)


def test_one_run_has_no_marginal_cpu() -> None:
    found = Measured(runs=[(1000, 5.0, 1.0, 0.0)])
    assert found.cpu_us is None
