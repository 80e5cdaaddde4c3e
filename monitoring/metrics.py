"""Prometheus metrics of the monitor (its own registry; `sluice monitor --serve` exposes them at
/metrics). Gauges hold the newest closed period's value; counters count since start."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from monitoring.records import AlertRecord, MonitorRecord, band_rank


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class MonitorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.records = Counter(
            "sluice_monitor_records",
            "Records read by topic kind and outcome (used, late, invalid)",
            ["kind", "outcome"],
            registry=r,
        )
        self.results = Counter(
            "sluice_monitor_results", "Monitor records written by check", ["check"], registry=r
        )
        self.alerts = Counter(
            "sluice_monitor_alerts",
            "Alerts raised by check and band",
            ["check", "band"],
            registry=r,
        )
        self.band = Gauge(
            "sluice_monitor_band",
            "Band of the newest period: 0 unknown, 1 none, 2 possible, 3 drift",
            ["check", "model", "version", "subject"],
            registry=r,
        )
        self.drift = Gauge(
            "sluice_monitor_drift",
            "Drift statistics of the newest period by feature (psi, ks_statistic, ks_pvalue, "
            "wasserstein, wasserstein_normed, js_distance, null_rate)",
            ["model", "version", "feature", "statistic"],
            registry=r,
        )
        self.freshness = Gauge(
            "sluice_monitor_freshness",
            "Freshness per view of the newest period (behind_rate, missing_rate, age_p95_s, "
            "late_rate, delay_p95_s)",
            ["view", "statistic"],
            registry=r,
        )
        self.live_mae = Gauge(
            "sluice_monitor_live_mae",
            "Live MAE of the newest period by version",
            ["model", "version"],
            registry=r,
        )
        self.skew = Gauge(
            "sluice_monitor_skew_mismatch_rate",
            "Share of sampled rows whose online values differ from the offline recomputation",
            ["model", "version"],
            registry=r,
        )
        self.serving = Gauge(
            "sluice_monitor_serving",
            "Serving of the newest period (throughput_rps, latency_p50/p95/p99_ms, batch_mean)",
            ["model", "statistic"],
            registry=r,
        )

    def observe(self, record: MonitorRecord) -> None:
        self.results.labels(record.check).inc()
        model = record.model or ""
        version = "" if record.model_version is None else str(record.model_version)
        subject = record.feature or record.view or ""
        if record.band is not None:
            self.band.labels(record.check, model, version, subject).set(band_rank(record.band))
        values = {k: _number(v) for k, v in record.values.items()}
        numbers = {k: v for k, v in values.items() if v is not None}
        if record.check == "drift":
            for name in ("psi", "ks_statistic", "ks_pvalue", "wasserstein", "js_distance"):
                if name in numbers:
                    self.drift.labels(model, version, subject, name).set(numbers[name])
            for name in ("wasserstein_normed", "null_rate"):
                if name in numbers:
                    self.drift.labels(model, version, subject, name).set(numbers[name])
        elif record.check in ("freshness", "stream_freshness"):
            for name in ("behind_rate", "missing_rate", "age_p95_s", "late_rate", "delay_p95_s"):
                if name in numbers:
                    self.freshness.labels(subject, name).set(numbers[name])
        elif record.check == "live_error" and "mae" in numbers:
            self.live_mae.labels(model, version).set(numbers["mae"])
        elif record.check == "skew" and "mismatch_rate" in numbers:
            self.skew.labels(model, version).set(numbers["mismatch_rate"])
        elif record.check == "serving":
            for name, value in numbers.items():
                if not name.startswith("share_"):
                    self.serving.labels(model, name).set(value)

    def alert(self, alert: AlertRecord) -> None:
        self.alerts.labels(alert.check, alert.band).inc()
