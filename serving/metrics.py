"""Prometheus metrics of one predictor app (own registry, so several apps can share a process)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

M = TypeVar("M", Counter, Gauge, Histogram)

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
