"""What the monitor has found so far, for the dashboard's JSON and the final summary.

The monitor's thread adds every record and alert; the dashboard's server thread reads
``snapshot()``, a JSON-ready dict with one entry per panel: each a list of series (name,
points as [period end ms, value]) or, for drift, the newest statistics per feature. A lock
guards both sides; the history kept is bounded (MAX_RECORDS records, MAX_ALERTS alerts).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from monitoring.records import AlertRecord, MonitorRecord
from monitoring.traffic import CacheReading

MAX_RECORDS = 50_000
MAX_ALERTS = 1_000
MAX_POINTS = 240


@dataclass
class Panel:
    title: str
    unit: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def add(self, name: str, at_ms: int, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        points = self.series.setdefault(name, [])
        points.append((at_ms, float(value)))
        points.sort(key=lambda p: p[0])
        del points[:-MAX_POINTS]

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "unit": self.unit,
            "series": [
                {"name": name, "points": [list(p) for p in points]}
                for name, points in sorted(self.series.items())
            ],
        }


def _ratio(values: dict[str, Any], top: str, bottom: str) -> float | None:
    a, b = values.get(top), values.get(bottom)
    if isinstance(a, int | float) and isinstance(b, int | float) and b > 0:
        return float(a) / float(b)
    return None


def _version(record: MonitorRecord) -> str:
    return f"{record.model} v{record.model_version}"


class MonitorState:
    """Thread-safe store of results for the dashboard (and the summary table)."""

    def __init__(self, period_s: float, clock: Callable[[], float] = time.time) -> None:
        self.period_s = period_s
        self._clock = clock
        self._lock = threading.Lock()
        self.started_at_ms = int(clock() * 1000)
        self.records: deque[MonitorRecord] = deque(maxlen=MAX_RECORDS)
        self.alerts: deque[AlertRecord] = deque(maxlen=MAX_ALERTS)
        self.consumed: Counter[str] = Counter()
        self.notes: dict[str, str] = {}
        self.cache_note: str | None = None
        self.cache: deque[CacheReading] = deque(maxlen=MAX_POINTS)
        self.training_mae: dict[str, float] = {}
        self.panels = {
            "latency": Panel("Latency percentiles", "ms"),
            "batch": Panel("Batch size", "rows"),
            "throughput": Panel("Throughput", "rows/s"),
            "cache": Panel("Cache hit rate", "share"),
            "freshness": Panel(
                "Freshness: p95 age of served windows / the contract's oldest (> 1: behind)",
                "ratio",
            ),
            "behind": Panel("Rows served behind the contract per view", "share"),
            "skew": Panel("Online/offline skew: mismatch rate", "share"),
            "mae": Panel("Live MAE per version", "label units"),
            "traffic": Panel("Traffic share per version", "share"),
        }
        # (model version, feature) -> the newest drift record's statistics
        self.drift: dict[tuple[str, str], MonitorRecord] = {}

    def add(self, record: MonitorRecord) -> None:
        with self._lock:
            self.records.append(record)
            self._chart(record)

    def _chart(self, record: MonitorRecord) -> None:
        p, at, values = self.panels, record.period_end_ms, record.values
        if record.check == "serving":
            for q in ("p50", "p95", "p99"):
                p["latency"].add(f"{record.model} {q}", at, values.get(f"latency_{q}_ms"))
            p["batch"].add(f"{record.model} mean", at, values.get("batch_mean"))
            p["batch"].add(f"{record.model} max", at, values.get("batch_max"))
            p["throughput"].add(str(record.model), at, values.get("throughput_rps"))
            for name, share in values.items():
                if name.startswith("share_v"):
                    p["traffic"].add(f"{record.model} {name[6:]}", at, share)
        elif record.check == "freshness":
            p["freshness"].add(str(record.view), at, _ratio(values, "age_p95_s", "contract_age_s"))
            p["behind"].add(str(record.view), at, values.get("behind_rate"))
        elif record.check == "stream_freshness":
            ratio = _ratio(values, "delay_p95_s", "lateness_s")
            p["freshness"].add(f"{record.view} (stream delay / lateness)", at, ratio)
        elif record.check == "skew":
            p["skew"].add(_version(record), at, values.get("mismatch_rate"))
        elif record.check == "live_error":
            p["mae"].add(_version(record), at, values.get("mae"))
            training = values.get("training_mae")
            if isinstance(training, int | float):
                self.training_mae[_version(record)] = float(training)
        elif record.check in ("drift", "prediction_drift"):
            feature = record.feature or "(prediction)"
            key = (_version(record), feature)
            old = self.drift.get(key)
            if old is None or old.period_start_ms <= record.period_start_ms:
                self.drift[key] = record

    def alert(self, alert: AlertRecord) -> None:
        with self._lock:
            self.alerts.append(alert)

    def count(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.consumed[kind] += n

    def note(self, key: str, text: str) -> None:
        with self._lock:
            self.notes[key] = text

    def cache_reading(self, reading: CacheReading | None, note: str | None) -> None:
        with self._lock:
            self.cache_note = note
            if reading is not None and reading.hit_rate is not None:
                self.panels["cache"].add("hit rate", reading.at_ms, reading.hit_rate)

    def snapshot(self) -> dict[str, Any]:
        """Everything the dashboard shows, JSON-ready."""
        with self._lock:
            panels = {name: panel.as_json() for name, panel in self.panels.items()}
            panels["cache"]["note"] = self.cache_note
            panels["mae"]["reference"] = [
                {"name": f"{name} (training)", "value": value}
                for name, value in sorted(self.training_mae.items())
            ]
            drift = [
                {
                    "version": version,
                    "feature": feature,
                    "band": record.band,
                    "period_end_ms": record.period_end_ms,
                    "rows": record.rows,
                    **{
                        k: record.values.get(k)
                        for k in (
                            "psi",
                            "ks_statistic",
                            "ks_pvalue",
                            "wasserstein_normed",
                            "js_distance",
                            "null_rate",
                            "reference",
                        )
                    },
                }
                for (version, feature), record in sorted(self.drift.items())
            ]
            return {
                "updated_at_ms": int(self._clock() * 1000),
                "started_at_ms": self.started_at_ms,
                "period_s": self.period_s,
                "consumed": dict(self.consumed),
                "records": len(self.records),
                "notes": dict(self.notes),
                "panels": panels,
                "drift": drift,
                "alerts": [a.model_dump(mode="json") for a in list(self.alerts)[-50:]][::-1],
            }

    def latest(self) -> list[MonitorRecord]:
        """The newest record per check and subject (for the summary table)."""
        with self._lock:
            newest: dict[tuple[Any, ...], MonitorRecord] = {}
            for r in self.records:
                key = (r.check, r.model, r.model_version, r.view, r.feature)
                if key not in newest or newest[key].period_start_ms <= r.period_start_ms:
                    newest[key] = r
            return list(newest.values())
