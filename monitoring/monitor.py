"""The monitor's bookkeeping, free of Kafka: records in, results and alerts out, per period.

Periods are tumbling and epoch-aligned, ``settings.monitor_period_s`` long, per topic and by
record time: a prediction's ``time_ms``, a feedback's ``time_ms``, a feature row's
``emitted_at_ms``. The caller (monitoring/runner.py) decides when a topic's period is over
(``close(topic, up_to_ms)``); a record for a period already closed is late: counted, left out.

On a closed prediction period, per model version: ``drift`` and ``prediction_drift``
(monitoring/drift.py), per model ``serving`` (traffic.py), per view ``freshness``
(freshness.py), and the skew sample goes to the SkewChecker (skew.py); its ``skew`` record
comes later (``poll``). On a closed feedback period: ``live_error`` per version
(live_error.py). On a closed ``features.<view>`` period: ``stream_freshness``.

Every result goes to the sink (the monitoring topic), the Prometheus metrics and the
dashboard's state. A result whose band reaches ``alert_band`` ("drift" by default) also
raises an alert: an AlertRecord to the sink and one structured WARNING log line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from core.records import FeatureRow, FeedbackRecord, PredictionRecord
from core.settings import Settings
from features.definitions import FeatureService, FeatureView
from models.errors import ModelError
from models.registry import ModelRegistry, TrainingReference
from monitoring.drift import DriftAccumulator, Stamp, drift_records
from monitoring.freshness import (
    FreshnessAccumulator,
    StreamFreshnessAccumulator,
    freshness_record,
    stream_freshness_record,
)
from monitoring.live_error import (
    ErrorAccumulator,
    FeedbackJoin,
    Labelled,
    live_error_record,
)
from monitoring.metrics import MonitorMetrics
from monitoring.records import AlertRecord, Band, MonitorRecord, band_rank
from monitoring.skew import SkewChecker, SkewJob, SkewRow, in_sample, sample_key
from monitoring.state import MonitorState
from monitoring.traffic import ServingAccumulator, serving_record

log = logging.getLogger("sluice.monitor")
Sink = Callable[[MonitorRecord | AlertRecord], None]
Version = tuple[str, int]


@dataclass
class ModelInfo:
    """What the monitor needs of a model version, read once from the registry."""

    reference: TrainingReference | None
    training_mae: float | None
    service: FeatureService | None
    problem: str | None = None


@dataclass
class Period:
    """The accumulators of one topic's period."""

    start_ms: int
    end_ms: int
    drift: dict[Version, DriftAccumulator] = field(default_factory=dict)
    serving: dict[str, ServingAccumulator] = field(default_factory=dict)
    freshness: dict[str, FreshnessAccumulator] = field(default_factory=dict)
    skew: dict[Version, SkewJob] = field(default_factory=dict)
    errors: dict[Version, ErrorAccumulator] = field(default_factory=dict)
    stream: StreamFreshnessAccumulator | None = None


class Monitor:
    def __init__(
        self,
        settings: Settings,
        *,
        views: Mapping[str, FeatureView],
        services: Mapping[str, FeatureService],
        registry: ModelRegistry,
        sink: Sink,
        skew: SkewChecker | None = None,
        state: MonitorState | None = None,
        metrics: MonitorMetrics | None = None,
        alert_band: Band = "drift",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.period_ms = max(1, int(settings.monitor_period_s * 1000))
        self.views = dict(views)
        self.services = dict(services)
        self.registry = registry
        self.sink = sink
        self.skew = skew
        self.state = state or MonitorState(settings.monitor_period_s, clock)
        self.metrics = metrics or MonitorMetrics()
        self.alert_band = alert_band
        self.clock = clock
        self.join = FeedbackJoin()
        self.periods: dict[str, dict[int, Period]] = {}
        # topic -> periods starting before this are closed (restored after a restart)
        self.closed_until: dict[str, int] = {}
        self.pending_skew: dict[tuple[str, int], int] = {}  # (topic, start) -> jobs out
        self.late: dict[str, int] = {}
        self.written = 0
        self.alerts_raised: list[AlertRecord] = []
        self._models: dict[Version, ModelInfo] = {}
        self._feedback_topic = settings.feedback_topic
        self._stream_view = {f"features.{name}": view for name, view in self.views.items()}

    # --- records in -------------------------------------------------------------------

    def _period(self, topic: str, time_ms: int) -> Period | None:
        start = time_ms - time_ms % self.period_ms
        if start < self.closed_until.get(topic, -(2**62)):
            self.late[topic] = self.late.get(topic, 0) + 1
            return None
        periods = self.periods.setdefault(topic, {})
        period = periods.get(start)
        if period is None:
            period = periods[start] = Period(start, start + self.period_ms)
        return period

    def model(self, name: str, version: int) -> ModelInfo:
        info = self._models.get((name, version))
        if info is None:
            info = self._load(name, version)
            self._models[(name, version)] = info
        return info

    def _load(self, name: str, version: int) -> ModelInfo:
        try:
            meta = self.registry.metadata(name, version)
            reference = self.registry.reference(name, version)
        except ModelError as exc:
            self.state.note(f"{name} v{version}", f"not in the registry: {exc}")
            return ModelInfo(None, None, None, str(exc))
        service = self.services.get(meta.feature_service)
        if reference is None:
            self.state.note(f"{name} v{version}", "no reference: saved before references")
            log.warning("model has no training reference", extra={"model": name, "v": version})
        return ModelInfo(reference, meta.metrics.mae, service)

    def add_prediction(self, topic: str, record: PredictionRecord) -> int | None:
        """Account one logged prediction; its period's start, or None when it is late."""
        period = self._period(topic, record.time_ms)
        for labelled in self.join.on_prediction(record):
            self._labelled(labelled)
        if period is None:
            return None
        version = (record.model, record.model_version)
        drift = period.drift.get(version)
        if drift is None:
            drift = period.drift[version] = DriftAccumulator(*version)
        drift.add(record)
        serving = period.serving.get(record.model)
        if serving is None:
            serving = period.serving[record.model] = ServingAccumulator(record.model)
        serving.add(record)
        for view_name in record.feature_ages_ms:
            view = self.views.get(view_name)
            if view is None:
                continue
            fresh = period.freshness.get(view_name)
            if fresh is None:
                fresh = period.freshness[view_name] = FreshnessAccumulator(view)
            fresh.add(record)
        self._sample(period, record)
        return period.start_ms

    def _sample(self, period: Period, record: PredictionRecord) -> None:
        fraction = self.settings.monitor_skew_sample
        if self.skew is None or fraction <= 0:
            return
        info = self.model(record.model, record.model_version)
        if info.service is None:
            return
        if not in_sample(sample_key(info.service, record.request), fraction):
            return
        version = (record.model, record.model_version)
        job = period.skew.get(version)
        if job is None:
            stamp = Stamp(period.start_ms, period.end_ms, 0)
            job = period.skew[version] = SkewJob(stamp, *version, info.service)
        job.rows.append(SkewRow.of(record, info.service))

    def add_feedback(self, topic: str, record: FeedbackRecord) -> int | None:
        """Account one feedback record; the start of the period that holds its offset."""
        self._feedback_topic = topic
        period = self._period(topic, record.time_ms)
        labelled = self.join.on_feedback(record)
        if labelled is not None:
            self._labelled(labelled, topic)
        return None if period is None else period.start_ms

    def _labelled(self, labelled: Labelled, topic: str | None = None) -> None:
        topic = topic or self._feedback_topic
        start = labelled.time_ms - labelled.time_ms % self.period_ms
        period = self.periods.get(topic, {}).get(start)
        if period is None:  # its period is closed: it counts in the totals only
            return
        version = (labelled.model, labelled.version)
        acc = period.errors.get(version)
        if acc is None:
            acc = period.errors[version] = ErrorAccumulator(*version)
        acc.add(labelled)

    def add_feature_row(self, topic: str, row: FeatureRow) -> int | None:
        view = self._stream_view.get(topic) or self.views.get(row.view)
        if view is None:
            return None
        period = self._period(topic, row.emitted_at_ms)
        if period is None:
            return None
        if period.stream is None:
            period.stream = StreamFreshnessAccumulator(view)
        period.stream.add(row)
        return period.start_ms

    # --- periods out ------------------------------------------------------------------

    def open_periods(self, topic: str) -> list[int]:
        return sorted(self.periods.get(topic, {}))

    def close(self, topic: str, up_to_ms: int) -> list[int]:
        """Close the topic's periods that end at or before up_to_ms; the starts of those whose
        results are all written (a period with a skew sample out is released by ``poll``)."""
        periods = self.periods.get(topic, {})
        done = []
        for start in sorted(periods):
            period = periods[start]
            if period.end_ms > up_to_ms:
                break
            del periods[start]
            self.closed_until[topic] = max(self.closed_until.get(topic, 0), period.end_ms)
            if self._finish(topic, period):
                done.append(start)
        return done

    def close_all(self, topic: str) -> list[int]:
        return self.close(topic, 2**62)

    def _finish(self, topic: str, period: Period) -> bool:
        stamp = Stamp(period.start_ms, period.end_ms, int(self.clock() * 1000))
        min_rows = self.settings.monitor_min_rows
        for (name, version), drift in sorted(period.drift.items()):
            reference = self.model(name, version).reference
            for record in drift_records(stamp, drift, reference, min_rows):
                self.emit(record)
        for serving in period.serving.values():
            self.emit(serving_record(stamp, serving))
        for fresh in period.freshness.values():
            self.emit(freshness_record(stamp, fresh))
        for (name, version), errors in sorted(period.errors.items()):
            self.emit(live_error_record(stamp, errors, self.model(name, version).training_mae))
        if period.stream is not None:
            self.emit(stream_freshness_record(stamp, period.stream))
        if period.skew and self.skew is not None:
            for job in period.skew.values():
                job.stamp = stamp
                self.skew.submit(job)
            self.pending_skew[(topic, period.start_ms)] = len(period.skew)
            return False
        return True

    def poll(self) -> list[tuple[str, int]]:
        """Write the skew results that are ready; the (topic, start) of periods now done."""
        if self.skew is None:
            return []
        released = []
        for job, record in self.skew.results():
            self.emit(record)
            for key in [k for k in self.pending_skew if k[1] == job.stamp.start_ms]:
                self.pending_skew[key] -= 1
                if self.pending_skew[key] <= 0:
                    del self.pending_skew[key]
                    released.append(key)
        return released

    def emit(self, record: MonitorRecord) -> None:
        self.written += 1
        self.metrics.observe(record)
        self.state.add(record)
        self.sink(record)
        if record.band is not None and band_rank(record.band) >= band_rank(self.alert_band):
            self._alert(record)

    def _alert(self, record: MonitorRecord) -> None:
        metric = str(record.values.get("decided_by") or "band")
        value = record.values.get(metric)
        threshold = record.values.get("threshold")
        number = float(value) if isinstance(value, int | float) else None
        limit = float(threshold) if isinstance(threshold, int | float) else 0.0
        subject = " ".join(
            str(part)
            for part in (
                record.model,
                None if record.model_version is None else f"v{record.model_version}",
                record.view,
                record.feature,
            )
            if part is not None
        )
        shown = "?" if number is None else f"{number:.4g}"
        message = (
            f"{record.check} {subject}: {metric} {shown} >= {limit:g} ({record.band}) in the "
            f"period starting {_iso(record.period_start_ms)}"
        )
        alert = AlertRecord(
            check=record.check,
            period_start_ms=record.period_start_ms,
            period_end_ms=record.period_end_ms,
            model=record.model,
            model_version=record.model_version,
            view=record.view,
            feature=record.feature,
            band=record.band or "unknown",
            metric=metric,
            value=number,
            threshold=limit,
            message=message,
            at_ms=record.at_ms,
        )
        log.warning(
            "monitor alert",
            extra={
                "alert": message,
                "check": alert.check,
                "band": alert.band,
                "model": alert.model,
                "version": alert.model_version,
                "view": alert.view,
                "feature": alert.feature,
                "metric": metric,
                "value": number,
                "threshold": limit,
                "period_start_ms": alert.period_start_ms,
                "items": record.items[:20],
            },
        )
        self.alerts_raised.append(alert)
        self.metrics.alert(alert)
        self.state.alert(alert)
        self.sink(alert)


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))
