"""Prometheus metrics of one predictor app (own registry, so several apps can share a process),
and their sum over the worker processes of one server (WorkerMetrics)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

M = TypeVar("M", Counter, Gauge, Histogram)
log = logging.getLogger("sluice.serving.metrics")
SNAPSHOT_S = 0.5  # how often each worker publishes its metrics (WorkerMetrics)
# Set by serving.workers.serve for its worker processes: the server's metrics directory.
WORKERS_DIR_ENV = "SLUICE_SERVE_METRICS_DIR"

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_AGE_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86_400, 3 * 86_400, 30 * 86_400)


class Children(Generic[M]):
    """A metric's children by label values, looked up once: ``labels()`` takes a lock, builds
    a key and checks every value on each call, several times per request on the hot path.
    Only for metrics whose children are never removed."""

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._children: dict[tuple[Hashable, ...], M] = {}

    def __call__(self, *values: Any) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*map(str, values))
        return child


class ServingMetrics:
    def __init__(self) -> None:
        self.workers: WorkerMetrics | None = None  # share(): a scrape covers every worker
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sluice_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.request_latency = Histogram(
            "sluice_request_latency_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter(
            "sluice_predictions",
            "Rows predicted by model and version",
            ["model", "version"],
            registry=r,
        )
        self.batch_size = Gauge(
            "sluice_batch_size",
            "Current AIMD batch size limit per model version",
            ["model", "version"],
            registry=r,
        )
        self.batch_rows = Histogram(
            "sluice_batch_rows",
            "Rows per executed batch",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.batch_latency = Histogram(
            "sluice_batch_latency_seconds",
            "Feature read + predict time per batch",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_request_latency = Histogram(
            "sluice_batch_request_latency_seconds",
            "Per batch, its slowest request's time in the server (queue + feature read + "
            "predict): what AIMD holds to the latency objective",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.shadow_predictions = Counter(
            "sluice_shadow_predictions",
            "Shadow rows by model, version and outcome (logged, dropped: queue full, failed)",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "sluice_queue_depth", "Requests waiting per model", ["model"], registry=r
        )
        self.feature_age = Histogram(
            "sluice_feature_age_seconds",
            "Age of the online row used (now - window end) per view",
            ["view"],
            buckets=_AGE_BUCKETS,
            registry=r,
        )
        self.missing = Counter(
            "sluice_features_missing",
            "Rows served with a view's defaults (no online row)",
            ["view"],
            registry=r,
        )
        self.contract_rows = Counter(
            "sluice_contract_rows",
            "Rows served per view by the availability contract's verdict: exact (the window "
            "due at t), behind (older: the stream is late), missing (no servable row)",
            ["view", "status"],
            registry=r,
        )
        # sluice_log_records_total and the log's gauges: serving.prediction_log.LogCollector.
        self.degraded_rows = Counter(
            "sluice_degraded_rows",
            "Rows answered from the views' empty values without reading the online store, by "
            "reason: store_unavailable (the read failed or timed out), breaker_open (not "
            "asked), deadline (the request's deadline came before its batch)",
            ["model", "reason"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "sluice_breaker_state",
            "The online store's circuit breaker: 0 closed, 1 half-open (probing), 2 open",
            registry=r,
        )
        self.breaker_transitions = Counter(
            "sluice_breaker_transitions",
            "Moves of the online store's circuit breaker, by the state moved to",
            ["to"],
            registry=r,
        )
        self.model_swaps = Counter(
            "sluice_model_swaps", "Promotions applied (hot swaps)", ["model"], registry=r
        )
        # The request path's children (serving/predictor.py record, serving/fastpath.py).
        self.request_children = Children(self.requests)
        self.request_latency_child = Children(self.request_latency)
        self.prediction_children = Children(self.predictions)
        self.degraded_children = Children(self.degraded_rows)
        self.missing_children = Children(self.missing)
        self.feature_age_children = Children(self.feature_age)
        self.contract_children = Children(self.contract_rows)
        self.queue_depth_children = Children(self.queue_depth)

    def exposition(self) -> bytes:
        """/metrics' body: this process's metrics, or with ``share`` every worker's."""
        if self.workers is not None:
            return self.workers.exposition()
        return generate_latest(self.registry)

    def share(self, directory: Path, worker: str) -> None:
        """Publish this worker's metrics in ``directory`` and answer scrapes for all workers
        there (serving/workers.py; WorkerMetrics)."""
        self.workers = WorkerMetrics(self.registry, directory, worker)
        self.workers.start()


class WorkerMetrics:
    """/metrics across the server's worker processes (``sluice serve --workers N``).

    A scrape reaches one worker, whichever accepts the connection. So every worker writes a
    snapshot of its registry (every sample of every family, custom collectors' too) to
    ``<directory>/<worker>.json`` every SNAPSHOT_S seconds, and the worker answering a scrape
    writes its own afresh, then merges every snapshot in the directory:

    - counters, histograms (and anything untyped): summed per sample and label set (their
      ``_created`` samples, per-process timestamps, left out);
    - gauges: one sample per worker, labelled ``worker="<slot>"`` (a batch size, a breaker
      state or a queue depth is a worker's own; sum them in the query if that is meant).

    So a scrape covers every worker, the others as of at most SNAPSHOT_S ago. Nothing happens on
    the request path (prometheus_client's multiprocess mode writes a file on every increment
    instead, and does not take custom collectors). A worker restarted by the supervisor takes
    its predecessor's slot (serving/workers.py) and file: its counters restart from zero, a
    counter reset as after any restart. The directory is the server's, made and removed by
    serving.workers.serve.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        directory: Path,
        worker: str,
        interval_s: float = SNAPSHOT_S,
    ) -> None:
        self.registry = registry
        self.directory = directory
        self.worker = worker
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one writer of our file at a time

    def start(self) -> None:
        self.write()
        self._thread = threading.Thread(target=self._run, name="sluice-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            self.write()  # the last counts stay in the sum (the worker's share of the totals)
        except OSError as exc:  # the server's directory gone already: nothing to add to
            log.warning("worker metrics: last snapshot not written", extra={"error": str(exc)})

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.write()
            except Exception:  # a full disk must not end the thread; the next round retries
                log.exception("worker metrics snapshot failed")

    def write(self) -> None:
        families = [
            [f.name, f.type, f.documentation, [[s.name, s.labels, s.value] for s in f.samples]]
            for f in self.registry.collect()
        ]
        path = self.directory / f"{self.worker}.json"
        with self._lock:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(orjson.dumps(families))
            os.replace(tmp, path)  # a reader sees the old snapshot or the new, never half

    def exposition(self) -> bytes:
        self.write()
        merged: dict[str, Metric] = {}
        sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for path in sorted(self.directory.glob("*.json")):
            try:
                families = orjson.loads(path.read_bytes())
            except (OSError, orjson.JSONDecodeError):  # a worker gone with its file: skip it
                continue
            worker = path.stem
            for name, kind, documentation, samples in families:
                if name not in merged:
                    merged[name] = Metric(name, documentation, kind)
                    sums[name] = {}
                family = sums[name]
                for sample_name, labels, value in samples:
                    if kind == "gauge":
                        labels = {**labels, "worker": worker}
                    elif sample_name.endswith("_created"):
                        continue
                    key = (sample_name, tuple(labels.items()))
                    family[key] = family.get(key, 0.0) + value
        for name, family in sums.items():
            for (sample_name, labels), value in family.items():
                merged[name].add_sample(sample_name, dict(labels), value)
        return generate_latest(_Families(list(merged.values())))


class _Families:
    """A registry-like source of already-built families, for generate_latest."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families
