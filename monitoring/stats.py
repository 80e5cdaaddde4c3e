"""The statistics of the monitor and the bands they fall in, in one place.

Drift of one feature in one period, against its training reference (models.registry):

- numeric features: the two-sample Kolmogorov-Smirnov test (scipy.stats.ks_2samp, exact
  p-values for small samples; the reference side is the stored sketch, so its sample size is
  at most the sketch's points, which makes the p-value conservative), the Wasserstein distance
  (scipy.stats.wasserstein_distance) and the same divided by the reference's standard
  deviation (Evidently's "normed" Wasserstein), and the population stability index over the
  reference's deciles plus one bin for nulls (so a jump in the null rate shows as drift);
- categorical features (bool and string): the Jensen-Shannon distance (base 2, in [0, 1]) and
  the PSI over the reference's values, one bin for the rest and one for nulls.

Bands (``none`` / ``possible`` / ``drift``; ``unknown`` with too few rows or no reference),
following the thresholds the established tools use:

    PSI                      < 0.1 none    0.1 - 0.25 possible   >= 0.25 drift   (the credit-
                                                                  scoring rule of thumb, used
                                                                  by Evidently and NannyML)
    Jensen-Shannon distance  < 0.1 none    0.1 - 0.2  possible   >= 0.2  drift   (Evidently's
                                                                  drift threshold is 0.1)
    normed Wasserstein       < 0.1 none    0.1 - 0.2  possible   >= 0.2  drift   (Evidently:
                                                                  0.1), counted only when the
                                                                  KS test rejects at 0.05
A numeric feature's band is the higher of its PSI band and its (KS-confirmed) Wasserstein
band; a categorical one's the higher of its PSI and JS bands. The KS test alone never raises a
band: with thousands of rows it rejects for differences nobody cares about.

Other bands, documented where they are computed and listed here:

    skew: share of sampled rows with any feature off   < 0.01 none, 0.01 - 0.05 possible
    live error: live MAE / training MAE                 < 1.2 none, 1.2 - 1.5 possible
    freshness: share of rows served behind the contract < 0.01 none, 0.01 - 0.05 possible
(and drift from the upper bound on). SMAPE is Chronon's: mean of 2|a - b| / (|a| + |b|), 0
where both are 0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from models.fit import category
from models.registry import CategoricalReference, NumericReference
from monitoring.records import Band, Scalar, band_rank

Thresholds = tuple[float, float]  # where "possible" and "drift" begin

PSI_BANDS: Thresholds = (0.1, 0.25)
JS_BANDS: Thresholds = (0.1, 0.2)
WASSERSTEIN_BANDS: Thresholds = (0.1, 0.2)
KS_ALPHA = 0.05
SKEW_BANDS: Thresholds = (0.01, 0.05)
MAE_RATIO_BANDS: Thresholds = (1.2, 1.5)
BEHIND_BANDS: Thresholds = (0.01, 0.05)
PSI_EPSILON = 1e-4  # floor of a bin's share: an empty bin would make the PSI infinite
PSI_BINS = 10
# Relative tolerance of an online value against the offline one (float round trips).
SKEW_RTOL = 1e-9


def band_of(value: float | None, thresholds: Thresholds) -> Band:
    """The band of a value against (possible, drift) thresholds; unknown for None/NaN."""
    if value is None or math.isnan(value):
        return "unknown"
    if value >= thresholds[1]:
        return "drift"
    if value >= thresholds[0]:
        return "possible"
    return "none"


def threshold_of(band: Band, thresholds: Thresholds) -> float | None:
    """Where a band begins: the possible or the drift threshold (None for none/unknown)."""
    return {"possible": thresholds[0], "drift": thresholds[1]}.get(band)


def finite(value: float | None) -> float | None:
    """The value, or None when it is NaN or infinite (JSON has neither)."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def ks_2samp(current: npt.ArrayLike, reference: npt.ArrayLike) -> tuple[float, float]:
    """The two-sample KS statistic and its two-sided p-value (scipy's ``auto`` method)."""
    from scipy import stats  # type: ignore[import-untyped]

    result = stats.ks_2samp(current, reference)
    return float(result.statistic), float(result.pvalue)


def wasserstein(current: npt.ArrayLike, reference: npt.ArrayLike) -> float:
    """The first Wasserstein (earth mover's) distance between two samples."""
    from scipy import stats

    return float(stats.wasserstein_distance(current, reference))


def psi(current: npt.ArrayLike, reference: npt.ArrayLike) -> float:
    """Population stability index of two distributions over the same bins (shares).

    sum((c - r) * ln(c / r)), every share floored at PSI_EPSILON."""
    c = np.maximum(np.asarray(current, dtype=float), PSI_EPSILON)
    r = np.maximum(np.asarray(reference, dtype=float), PSI_EPSILON)
    return float(np.sum((c - r) * np.log(c / r)))


def js_distance(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon distance (the square root of the divergence), base 2: 0 to 1.

    Equals scipy.spatial.distance.jensenshannon(p, q, base=2); p and q are normalized."""
    a = np.asarray(p, dtype=float)
    b = np.asarray(q, dtype=float)
    a, b = a / a.sum(), b / b.sum()
    m = (a + b) / 2

    def kl(x: npt.NDArray[np.float64]) -> float:
        mask = x > 0
        return float(np.sum(x[mask] * np.log2(x[mask] / m[mask])))

    return math.sqrt(max(0.0, (kl(a) + kl(b)) / 2))


def decile_edges(sample: Sequence[float], bins: int = PSI_BINS) -> npt.NDArray[np.float64]:
    """Inner bin edges of the reference: its quantiles at 1/bins .. (bins-1)/bins, distinct."""
    if not len(sample):
        return np.array([], dtype=float)
    quantiles = np.quantile(np.asarray(sample, dtype=float), np.arange(1, bins) / bins)
    return np.asarray(np.unique(quantiles), dtype=np.float64)


def binned_shares(
    values: npt.NDArray[np.float64], edges: npt.NDArray[np.float64], null_rate: float
) -> npt.NDArray[np.float64]:
    """Shares of the bins (-inf, e1), [e1, e2), ..., [ek, inf) among all rows, and of nulls
    last; ``values`` are the non-null ones, ``null_rate`` the share of the rest."""
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    total = counts.sum()
    shares = counts / total * (1 - null_rate) if total else np.zeros(len(edges) + 1)
    return np.append(shares, null_rate)


@dataclass
class DriftResult:
    """A feature's statistics in one period and the band they put it in."""

    band: Band
    rows: int
    decided_by: str | None  # the statistic whose band is the result's band
    value: float | None  # its value
    threshold: float | None  # where that band begins
    values: dict[str, Scalar] = field(default_factory=dict)


Candidate = tuple[str, float | None, Thresholds]  # statistic, value, its thresholds


def _decide(result: DriftResult, candidates: Iterable[Candidate]) -> None:
    """Set the result's band to the highest of the candidates' (the first wins a tie)."""
    best: tuple[Band, str, float | None, float | None] = ("unknown", "", None, None)
    for name, value, thresholds in candidates:
        band = band_of(value, thresholds)
        if band_rank(band) > band_rank(best[0]):
            threshold = threshold_of(band, thresholds)
            best = (band, name, value, threshold)
    result.band, name, result.value, result.threshold = best
    result.decided_by = name or None


def numeric_drift(values: Sequence[Any], reference: NumericReference) -> DriftResult:
    """Drift of a numeric feature's values in a period (None or NaN for nulls)."""
    raw = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    present = raw[~np.isnan(raw)]
    rows = len(raw)
    null_rate = float(1 - len(present) / rows) if rows else 0.0
    result = DriftResult("unknown", rows, None, None, None)
    result.values = {
        "null_rate": null_rate,
        "reference_null_rate": reference.null_rate,
        "mean": finite(float(present.mean())) if len(present) else None,
        "reference_mean": reference.mean,
    }
    if rows == 0 or (not reference.sample and reference.null_rate == 0):
        return result
    edges = decile_edges(reference.sample)
    sample = np.asarray(reference.sample, dtype=float)
    psi_value = psi(
        binned_shares(present, edges, null_rate),
        binned_shares(sample, edges, reference.null_rate),
    )
    result.values["psi"] = finite(psi_value)
    candidates: list[Candidate] = [("psi", psi_value, PSI_BANDS)]
    if len(present) and len(sample):
        statistic, pvalue = ks_2samp(present, sample)
        distance = wasserstein(present, sample)
        std = reference.std or 0.0
        normed = distance / std if std > 0 else (0.0 if distance == 0 else math.inf)
        result.values |= {
            "ks_statistic": statistic,
            "ks_pvalue": pvalue,
            "wasserstein": finite(distance),
            "wasserstein_normed": finite(normed),
        }
        if pvalue < KS_ALPHA:
            candidates.append(("wasserstein_normed", normed, WASSERSTEIN_BANDS))
    _decide(result, candidates)
    return result


def categorical_drift(values: Sequence[Any], reference: CategoricalReference) -> DriftResult:
    """Drift of a categorical feature's values in a period (None for nulls)."""
    rows = len(values)
    counts = Counter(category(v) for v in values if v is not None)
    present = sum(counts.values())
    null_rate = 1 - present / rows if rows else 0.0
    result = DriftResult("unknown", rows, None, None, None)
    result.values = {"null_rate": null_rate, "reference_null_rate": reference.null_rate}
    if rows == 0:
        return result
    known = [k for k in reference.frequencies if k != CategoricalReference.OTHER]
    other = sum(n for k, n in counts.items() if k not in reference.frequencies)
    current = [counts.get(k, 0) / rows for k in known]
    current += [(other + counts.get(CategoricalReference.OTHER, 0)) / rows, null_rate]
    scale = 1 - reference.null_rate
    expected = [reference.frequencies[k] * scale for k in known]
    expected += [reference.frequencies.get(CategoricalReference.OTHER, 0.0) * scale]
    expected += [reference.null_rate]
    psi_value = psi(current, expected)
    js = js_distance(current, expected) if sum(current) and sum(expected) else None
    result.values |= {"psi": finite(psi_value), "js_distance": js}
    _decide(result, [("psi", psi_value, PSI_BANDS), ("js_distance", js, JS_BANDS)])
    return result


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> list[float | None]:
    """Percentiles (linear interpolation), None each when there are no values."""
    if not len(values):
        return [None for _ in qs]
    return [float(x) for x in np.percentile(np.asarray(values, dtype=float), list(qs))]


def smape(online: Sequence[float], offline: Sequence[float]) -> float:
    """Symmetric mean absolute percentage error, Chronon's: 2|a-b| / (|a|+|b|), 0 if both 0."""
    a = np.asarray(online, dtype=float)
    b = np.asarray(offline, dtype=float)
    if not len(a):
        return 0.0
    denominator = np.abs(a) + np.abs(b)
    terms = np.divide(2 * np.abs(a - b), denominator, out=np.zeros_like(a), where=denominator != 0)
    return float(terms.mean())


def same_value(online: Any, offline: Any) -> bool:
    """Whether a logged online value equals the offline one: both null, or equal numbers
    (within SKEW_RTOL relative, for float round trips), or equal otherwise."""
    if online is None or offline is None:
        return online is None and offline is None
    if isinstance(online, int | float) and isinstance(offline, int | float):
        a, b = float(online), float(offline)
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=SKEW_RTOL, abs_tol=1e-12)
    return bool(online == offline)


def shares(counts: Mapping[Any, int]) -> dict[Any, float]:
    total = sum(counts.values())
    return {k: n / total for k, n in counts.items()} if total else {}
