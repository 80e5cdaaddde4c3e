"""Row-level online/offline skew: logged online values against what training would have read.

A reproducible sample of the logged rows (``in_sample``: a hash of the row's entity keys below
``settings.monitor_skew_sample``, so the same entities are always in it and a test or a person
can tell which) is recomputed offline: ``batch.training.training_set`` (Spark) joins each row's
entities at its request time t (``as_of_ms``, else ``time_ms``) with the offline store under
the availability contract, exactly as a training set does. Each logged view feature is then
compared with its offline value (``stats.same_value``), as Chronon's consistency job does, but
per period instead of daily. Per model version and period, one ``skew`` record:

- mismatch_rate: share of compared rows with any view feature off; ``mismatch:<ref>`` per
  feature; ``smape:<ref>`` per feature (over rows where both values are numbers);
- missing_rows: a view served without a row (defaults) where the offline store had values;
  extra_rows: a view served with non-empty values where the offline store had none;
- items: the skewed entities as "view:entity_key" (at most MAX_ITEMS).
Band: the mismatch rate, < 0.01 none, 0.01 - 0.05 possible, above drift.

Spark runs in one worker thread, so consuming never waits for it; samples of periods that
close while a job runs are recomputed together in the next job. A failed recomputation (no
offline store, Spark down) gives records of band ``unknown`` naming the error.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.records import PredictionRecord
from core.settings import Settings
from features.definitions import FeatureService, empty_value
from monitoring.drift import Stamp
from monitoring.records import MonitorRecord, Scalar
from monitoring.stats import SKEW_BANDS, band_of, same_value, smape, threshold_of

log = logging.getLogger("sluice.monitor.skew")
MAX_ITEMS = 200
_ID_COLUMN = "__prediction_id"


def sample_key(service: FeatureService, request: Mapping[str, Any]) -> str:
    """The row's entity keys as one text: "restaurant_id=r001,zone_id=z3" (sorted by key)."""
    keys = sorted({e.join_key for e in service.entities})
    return ",".join(f"{k}={request.get(k)}" for k in keys)


def in_sample(key: str, fraction: float) -> bool:
    """Whether a row with this sample key is in the sample: the same answer on every run."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


@dataclass(frozen=True)
class SkewRow:
    """What the comparison needs of one sampled prediction record."""

    prediction_id: str
    as_of_ms: int
    entities: dict[str, str]  # join key -> entity key
    features: dict[str, Any]  # "view:feature" -> the logged online value
    missing_views: frozenset[str]  # views served without a row

    @classmethod
    def of(cls, record: PredictionRecord, service: FeatureService) -> SkewRow:
        views = {v.name for v in service.views}
        as_of = getattr(record, "as_of_ms", None) or record.time_ms
        return cls(
            prediction_id=record.prediction_id,
            as_of_ms=int(as_of),
            entities={e.join_key: str(record.request.get(e.join_key)) for e in service.entities},
            features={
                ref: value
                for ref, value in record.features.items()
                if ref.partition(":")[0] in views
            },
            missing_views=frozenset(m for m in record.missing if m in views),
        )


@dataclass
class SkewJob:
    """The sample of one model version in one period."""

    stamp: Stamp
    model: str
    version: int
    service: FeatureService
    rows: list[SkewRow] = field(default_factory=list)


Offline = Callable[[FeatureService, Sequence[SkewRow]], dict[str, dict[str, Any]]]


def spark_offline(settings: Settings) -> Offline:
    """The offline recomputation with Spark: prediction id -> "view:feature" -> value."""

    def recompute(service: FeatureService, rows: Sequence[SkewRow]) -> dict[str, dict[str, Any]]:
        from pyspark.sql.types import LongType, StringType, StructField, StructType

        from batch.session import spark_session
        from batch.training import feature_column, training_set

        spark = spark_session(settings)
        keys = sorted({e.join_key for e in service.entities})
        schema = StructType(
            [
                StructField(_ID_COLUMN, StringType(), False),
                *(StructField(k, StringType(), True) for k in keys),
                StructField("event_timestamp", LongType(), False),
            ]
        )
        labels = spark.createDataFrame(
            [(r.prediction_id, *(r.entities[k] for k in keys), r.as_of_ms) for r in rows], schema
        )
        columns = {
            f"{view.name}:{spec.name}": feature_column(view.name, spec.name)
            for view in service.views
            for spec in view.features()
        }
        out: dict[str, dict[str, Any]] = {}
        for row in training_set(spark, settings, service, labels).collect():
            out[row[_ID_COLUMN]] = {ref: row[column] for ref, column in columns.items()}
        return out

    return recompute


def compare(job: SkewJob, offline: Mapping[str, Mapping[str, Any]]) -> MonitorRecord:
    """The skew record of one job, given the offline values of its rows."""
    views = {v.name: v for v in job.service.views}
    empties = {
        f"{v.name}:{s.name}": empty_value(s.function)
        for v in job.service.views
        for s in v.features()
    }
    mismatched_rows = missing_rows = extra_rows = compared = 0
    by_feature: Counter[str] = Counter()
    pairs: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    entities: set[str] = set()
    for row in job.rows:
        theirs = offline.get(row.prediction_id)
        if theirs is None:
            continue
        compared += 1
        row_mismatch = False
        for view_name, view in views.items():
            refs = [r for r in row.features if r.partition(":")[0] == view_name]
            offline_present = any(
                not same_value(theirs.get(r), empties[r])
                for r in empties
                if r.partition(":")[0] == view_name
            )
            online_present = view_name not in row.missing_views
            online_empty = all(same_value(row.features[r], empties[r]) for r in refs)
            if offline_present and not online_present:
                missing_rows += 1
            elif online_present and not online_empty and not offline_present:
                extra_rows += 1
            view_mismatch = False
            for ref in refs:
                online, other = row.features[ref], theirs.get(ref)
                if isinstance(online, int | float) and isinstance(other, int | float):
                    pairs[ref][0].append(float(online))
                    pairs[ref][1].append(float(other))
                if not same_value(online, other):
                    by_feature[ref] += 1
                    view_mismatch = True
            if view_mismatch:
                row_mismatch = True
                entities.add(f"{view_name}:{row.entities[view.entity.join_key]}")
        mismatched_rows += row_mismatch
    rate = mismatched_rows / compared if compared else None
    band = band_of(rate, SKEW_BANDS)
    values: dict[str, Scalar] = {
        "sampled_rows": len(job.rows),
        "compared_rows": compared,
        "mismatched_rows": mismatched_rows,
        "mismatch_rate": rate,
        "missing_rows": missing_rows,
        "extra_rows": extra_rows,
        "decided_by": "mismatch_rate",
        "threshold": threshold_of(band, SKEW_BANDS),
    }
    for ref in sorted(pairs):
        values[f"mismatch:{ref}"] = by_feature.get(ref, 0)
        values[f"smape:{ref}"] = smape(*pairs[ref])
    return MonitorRecord(
        check="skew",
        period_start_ms=job.stamp.start_ms,
        period_end_ms=job.stamp.end_ms,
        model=job.model,
        model_version=job.version,
        rows=compared,
        band=band,
        values=values,
        items=sorted(entities)[:MAX_ITEMS],
        at_ms=job.stamp.at_ms,
    )


def failed(job: SkewJob, error: str) -> MonitorRecord:
    return MonitorRecord(
        check="skew",
        period_start_ms=job.stamp.start_ms,
        period_end_ms=job.stamp.end_ms,
        model=job.model,
        model_version=job.version,
        rows=0,
        band="unknown",
        values={"sampled_rows": len(job.rows), "error": error[:500]},
        at_ms=job.stamp.at_ms,
    )


class SkewChecker:
    """Recomputes samples in one worker thread; ``results()`` hands back finished records."""

    def __init__(self, offline: Offline) -> None:
        self._offline = offline
        self._todo: queue.Queue[SkewJob | None] = queue.Queue()
        self._done: queue.Queue[tuple[SkewJob, MonitorRecord]] = queue.Queue()
        self._busy = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sluice-monitor-skew", daemon=True)
        self._thread.start()

    def submit(self, job: SkewJob) -> None:
        with self._lock:
            self._busy += 1
        self._todo.put(job)

    @property
    def busy(self) -> int:
        """Jobs submitted whose result has not been handed back yet."""
        with self._lock:
            return self._busy

    def results(self) -> list[tuple[SkewJob, MonitorRecord]]:
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            self._busy -= len(out)
        return out

    def close(self) -> None:
        self._todo.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            first = self._todo.get()
            if first is None:
                return
            jobs = [first]
            while True:  # everything queued meanwhile goes into the same Spark jobs
                try:
                    more = self._todo.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._todo.put(None)
                    break
                jobs.append(more)
            self._work(jobs)

    def _work(self, jobs: list[SkewJob]) -> None:
        by_service: dict[str, list[SkewJob]] = defaultdict(list)
        for job in jobs:
            by_service[job.service.name].append(job)
        for group in by_service.values():
            rows = [row for job in group for row in job.rows]
            try:
                offline = self._offline(group[0].service, rows)
            except Exception as exc:  # Spark, the offline store: reported, never fatal
                log.error("skew recomputation failed", extra={"error": str(exc)})
                for job in group:
                    self._done.put((job, failed(job, f"{type(exc).__name__}: {exc}")))
                continue
            for job in group:
                self._done.put((job, compare(job, offline)))
