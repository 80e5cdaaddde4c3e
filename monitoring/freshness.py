"""Freshness per view against the availability contract (features/contract.py).

Served side, from the prediction log (one ``freshness`` record per view and period): a row
served at t should be the window ending at E(t) = floor((t - lateness) / slide) * slide. The
record gives each view's age (time_ms - window end) and, from the contract-aware predictor on,
the window end served, the contract's verdict (``row_status``: exact, behind, missing) and the
t rows were chosen for (``as_of_ms``). Without the verdict a row counts as behind when its
window end is before E(t) and its values are not all empty (an older closing row is exact).
Reported: the share of rows behind, missing (no servable row: defaults served) and stale
(older than the ttl), age percentiles, and how far behind E(t) the late rows were.
Band: the share behind, < 0.01 none, 0.01 - 0.05 possible, above drift.

Stream side, from ``features.<view>`` (one ``stream_freshness`` record per view and period,
by emission time): how long after its window's end each row left the window operator, and the
share that left after its servable time (end + lateness), which requests between the two saw
as behind. Band: that share, with the same thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.records import FeatureRow, PredictionRecord
from features.contract import lateness_ms, window_end_at
from features.definitions import FeatureView, empty_value
from monitoring.drift import Stamp
from monitoring.records import MonitorRecord
from monitoring.stats import BEHIND_BANDS, band_of, percentiles, threshold_of


def _optional(record: PredictionRecord, name: str) -> Any:
    # Fields of the contract-aware predictor (row_status, window_ends_ms, as_of_ms); records
    # written before it have none.
    return getattr(record, name, None)


def _all_empty(view: FeatureView, record: PredictionRecord) -> bool:
    """Whether every logged feature of the view holds its empty value (a closing row)."""
    seen = False
    for spec in view.features():
        ref = f"{view.name}:{spec.name}"
        if ref in record.features:
            seen = True
            if record.features[ref] != empty_value(spec.function):
                return False
    return seen


@dataclass
class FreshnessAccumulator:
    """The served rows of one view in one period."""

    view: FeatureView
    rows: int = 0
    missing: int = 0
    behind: int = 0
    stale: int = 0
    ages_ms: list[float] = field(default_factory=list)
    lags_ms: list[float] = field(default_factory=list)  # E(t) - served end, of rows behind

    def add(self, record: PredictionRecord) -> None:
        name = self.view.name
        if name not in record.feature_ages_ms:
            return  # the model does not read this view
        self.rows += 1
        status = (_optional(record, "row_status") or {}).get(name)
        age = record.feature_ages_ms[name]
        if name in record.stale:
            self.stale += 1
        if age is None:
            if status != "behind":
                self.missing += 1
            else:
                self.behind += 1
            return
        self.ages_ms.append(age)
        served_end = (_optional(record, "window_ends_ms") or {}).get(name)
        if served_end is None:
            served_end = record.time_ms - age
        as_of = _optional(record, "as_of_ms") or record.time_ms
        lag = window_end_at(self.view, as_of) - served_end
        behind = status == "behind" if status is not None else lag > 0
        if behind and status is None and _all_empty(self.view, record):
            behind = False  # an older closing row: E(t) is empty too (exact)
        if behind:
            self.behind += 1
            self.lags_ms.append(max(0, lag))


def freshness_record(stamp: Stamp, acc: FreshnessAccumulator) -> MonitorRecord:
    rows = acc.rows
    age50, age95, age_max = percentiles(acc.ages_ms, (50, 95, 100))
    (lag95,) = percentiles(acc.lags_ms, (95,))
    behind_rate = acc.behind / rows if rows else None
    band = band_of(behind_rate, BEHIND_BANDS)
    view = acc.view
    return MonitorRecord(
        check="freshness",
        period_start_ms=stamp.start_ms,
        period_end_ms=stamp.end_ms,
        view=view.name,
        rows=rows,
        band=band,
        values={
            "behind_rate": behind_rate,
            "missing_rate": acc.missing / rows if rows else None,
            "stale_rate": acc.stale / rows if rows else None,
            "age_p50_s": None if age50 is None else age50 / 1000,
            "age_p95_s": None if age95 is None else age95 / 1000,
            "age_max_s": None if age_max is None else age_max / 1000,
            "behind_lag_p95_s": None if lag95 is None else lag95 / 1000,
            # The oldest row the contract serves as exact is lateness + slide old.
            "contract_age_s": (lateness_ms(view) + view.slide_ms) / 1000,
            "decided_by": "behind_rate",
            "threshold": threshold_of(band, BEHIND_BANDS),
        },
        at_ms=stamp.at_ms,
    )


@dataclass
class StreamFreshnessAccumulator:
    """The rows one view's stream emitted in one period."""

    view: FeatureView
    delays_ms: list[float] = field(default_factory=list)
    late: int = 0

    def add(self, row: FeatureRow) -> None:
        self.delays_ms.append(row.emitted_at_ms - row.window_end_ms)
        if row.emitted_at_ms > row.window_end_ms + lateness_ms(self.view):
            self.late += 1


def stream_freshness_record(stamp: Stamp, acc: StreamFreshnessAccumulator) -> MonitorRecord:
    rows = len(acc.delays_ms)
    p50, p95, top = percentiles(acc.delays_ms, (50, 95, 100))
    late_rate = acc.late / rows if rows else None
    band = band_of(late_rate, BEHIND_BANDS)
    return MonitorRecord(
        check="stream_freshness",
        period_start_ms=stamp.start_ms,
        period_end_ms=stamp.end_ms,
        view=acc.view.name,
        rows=rows,
        band=band,
        values={
            "late_rate": late_rate,
            "delay_p50_s": None if p50 is None else p50 / 1000,
            "delay_p95_s": None if p95 is None else p95 / 1000,
            "delay_max_s": None if top is None else top / 1000,
            "lateness_s": lateness_ms(acc.view) / 1000,
            "decided_by": "late_rate",
            "threshold": threshold_of(band, BEHIND_BANDS),
        },
        at_ms=stamp.at_ms,
    )
