"""The monitor's statistics against values worked out by hand (scipy's formulas, small inputs)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from models.fit import categorical_reference, numeric_reference
from monitoring.stats import (
    PSI_BANDS,
    band_of,
    binned_shares,
    categorical_drift,
    decile_edges,
    js_distance,
    ks_2samp,
    numeric_drift,
    psi,
    same_value,
    smape,
    wasserstein,
)


def num(value: object) -> float:
    assert isinstance(value, int | float)
    return float(value)


def test_ks_statistic_and_exact_p_value_match_the_permutation_distribution():
    a, b = [1.0, 2.0, 3.0, 4.0], [3.5, 4.5, 5.0, 6.0]
    statistic, pvalue = ks_2samp(a, b)
    # ECDFs: after 3 and 4 of a, b has 0 and 1 of 4 below: |1 - 0.25| = 0.75 at x = 4.
    assert statistic == pytest.approx(0.75)

    # The exact two-sided p-value: the share of the C(8, 4) = 70 ways to split the pooled
    # values into two groups of 4 whose KS statistic is at least as large.
    pooled = a + b

    def d(x: list[float], y: list[float]) -> float:
        grid = sorted(x + y)
        return max(
            abs(sum(v <= t for v in x) / len(x) - sum(v <= t for v in y) / len(y)) for t in grid
        )

    splits = list(itertools.combinations(range(8), 4))
    extreme = sum(
        d([pooled[i] for i in s], [pooled[i] for i in range(8) if i not in s]) >= 0.75 - 1e-12
        for s in splits
    )
    assert len(splits) == 70
    assert pvalue == pytest.approx(extreme / 70)


def test_wasserstein_is_the_area_between_the_two_cdfs():
    assert wasserstein([0, 1, 3], [5, 6, 8]) == pytest.approx(5.0)  # a shift by 5
    # Equal sizes: the mean distance between sorted values, (0 + 0 + 1) / 3.
    assert wasserstein([1, 2, 3], [1, 2, 4]) == pytest.approx(1 / 3)
    # [0, 10] against [5]: |F - G| is 1/2 over [0, 10].
    assert wasserstein([0, 10], [5]) == pytest.approx(5.0)


def test_psi_by_hand():
    # (0.5 - 0.25) ln(0.5 / 0.25) + (0.5 - 0.75) ln(0.5 / 0.75)
    expected = 0.25 * math.log(2) + 0.25 * math.log(1.5)
    assert psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(expected)
    assert psi([0.3, 0.7], [0.3, 0.7]) == 0.0
    # An empty bin is floored at 1e-4 instead of making the index infinite.
    assert math.isfinite(psi([1.0, 0.0], [0.5, 0.5]))


def test_jensen_shannon_distance_by_hand_and_against_scipy():
    from scipy.spatial.distance import jensenshannon  # type: ignore[import-untyped]

    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    assert js_distance([0.2, 0.8], [0.2, 0.8]) == pytest.approx(0.0)
    # m = (0.75, 0.25); KL(p|m) = 0.5 log2(2/3) + 0.5 log2(2); KL(q|m) = log2(4/3).
    kl_p = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    kl_q = math.log2(1 / 0.75)
    assert js_distance([0.5, 0.5], [1, 0]) == pytest.approx(math.sqrt((kl_p + kl_q) / 2))
    p, q = [0.1, 0.4, 0.5], [0.3, 0.3, 0.4]
    assert js_distance(p, q) == pytest.approx(jensenshannon(p, q, base=2))


def test_bands_begin_at_their_thresholds():
    assert band_of(0.0999, PSI_BANDS) == "none"
    assert band_of(0.1, PSI_BANDS) == "possible"
    assert band_of(0.2499, PSI_BANDS) == "possible"
    assert band_of(0.25, PSI_BANDS) == "drift"
    assert band_of(None, PSI_BANDS) == "unknown"
    assert band_of(float("nan"), PSI_BANDS) == "unknown"


def test_decile_edges_of_tied_values_bin_consistently():
    assert decile_edges([12.0] * 50).tolist() == [12.0]
    edges = decile_edges([1.0, 1.0, 2.0, 2.0, 3.0, 3.0])
    shares = binned_shares(np.array([1.0, 2.0, 3.0, 3.0]), edges, 0.0)
    assert shares.sum() == pytest.approx(1.0)
    # With nulls: the non-null shares shrink and the last bin holds the null rate.
    with_nulls = binned_shares(np.array([1.0, 3.0]), edges, 0.5)
    assert with_nulls[-1] == 0.5
    assert with_nulls.sum() == pytest.approx(1.0)


def test_numeric_drift_flags_a_shift_and_not_a_fresh_sample_of_the_same():
    rng = np.random.default_rng(3)
    reference = numeric_reference(rng.normal(10, 2, 5000))
    assert len(reference.sample) == 1000  # sketched
    same = numeric_drift(rng.normal(10, 2, 400).tolist(), reference)
    assert same.band == "none"
    assert num(same.values["psi"]) < 0.1
    shifted = numeric_drift((rng.normal(10, 2, 400) + 3).tolist(), reference)
    assert shifted.band == "drift"
    assert shifted.decided_by == "psi"
    assert num(shifted.values["ks_pvalue"]) < 1e-6
    assert shifted.values["wasserstein"] == pytest.approx(3, abs=0.4)
    assert shifted.values["wasserstein_normed"] == pytest.approx(1.5, abs=0.25)


def test_numeric_drift_sees_a_jump_in_nulls():
    rng = np.random.default_rng(4)
    reference = numeric_reference(rng.normal(0, 1, 2000))
    values = [None if i % 2 else v for i, v in enumerate(rng.normal(0, 1, 400))]
    result = numeric_drift(values, reference)
    assert result.values["null_rate"] == pytest.approx(0.5)
    assert result.band == "drift"  # half the rows moved into the null bin


def test_categorical_drift_by_shares():
    reference = categorical_reference([True] * 700 + [False] * 300)
    assert reference.frequencies == {"true": 0.7, "false": 0.3}
    same = categorical_drift([True] * 70 + [False] * 30, reference)
    assert same.band == "none"
    assert same.values["psi"] == pytest.approx(0.0, abs=1e-9)
    flipped = categorical_drift([True] * 20 + [False] * 80, reference)
    assert flipped.band == "drift"
    assert num(flipped.values["js_distance"]) > 0.2


def test_smape_and_same_value():
    # (0 + 0 + 2 * 2 / 6) / 3: the zero pair counts as 0.
    assert smape([1, 0, 2], [1, 0, 4]) == pytest.approx((4 / 6) / 3)
    assert smape([], []) == 0.0
    assert same_value(None, None)
    assert not same_value(None, 0)
    assert same_value(3, 3.0)
    assert same_value(0.1 + 0.2, 0.3)
    assert not same_value(1.0, 1.001)
