"""What the predictor served in a period, from its prediction log: latency percentiles, batch
sizes, throughput and each version's share of the traffic (one ``serving`` record per model);
and the predictor's cache hit rate, read from its /metrics when it exposes one.

Batch sizes: a batch reads its features once and every row of it is logged with that read's
time, so the rows of one model that share ``time_ms`` are one batch. Two batches of a model
started in the same millisecond count as one (rare below a few thousand batches a second).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from core.records import PredictionRecord
from monitoring.drift import Stamp
from monitoring.records import MonitorRecord, Scalar
from monitoring.stats import percentiles, shares

log = logging.getLogger("sluice.monitor")


@dataclass
class ServingAccumulator:
    """The logged predictions of one model (all versions) in one period."""

    model: str
    latencies_ms: list[float] = field(default_factory=list)
    batches: Counter[int] = field(default_factory=Counter)  # time_ms -> rows
    versions: Counter[int] = field(default_factory=Counter)

    def add(self, record: PredictionRecord) -> None:
        self.latencies_ms.append(record.latency_ms)
        self.batches[record.time_ms] += 1
        self.versions[record.model_version] += 1


def serving_record(stamp: Stamp, acc: ServingAccumulator) -> MonitorRecord:
    rows = len(acc.latencies_ms)
    seconds = max((stamp.end_ms - stamp.start_ms) / 1000, 1e-9)
    p50, p95, p99 = percentiles(acc.latencies_ms)
    sizes = list(acc.batches.values())
    values: dict[str, Scalar] = {
        "throughput_rps": rows / seconds,
        "latency_p50_ms": p50,
        "latency_p95_ms": p95,
        "latency_p99_ms": p99,
        "batches": len(sizes),
        "batch_mean": sum(sizes) / len(sizes) if sizes else None,
        "batch_max": max(sizes) if sizes else None,
    }
    for version, share in sorted(shares(acc.versions).items()):
        values[f"share_v{version}"] = share
    return MonitorRecord(
        check="serving",
        period_start_ms=stamp.start_ms,
        period_end_ms=stamp.end_ms,
        model=acc.model,
        rows=rows,
        values=values,
        at_ms=stamp.at_ms,
    )


@dataclass
class CacheReading:
    at_ms: int
    hit_rate: float | None  # over the time since the previous reading; None: no lookups
    hits: float
    misses: float


class CacheScraper:
    """The predictor's cache hit rate from its Prometheus /metrics, if it exposes one.

    A counter family whose name holds "cache" counts hits and misses, either as two families
    (``..._hits_total`` / ``..._misses_total``) or as one with an outcome-like label whose value
    is hit or miss. ``note`` says why there is no rate when there is none.
    """

    def __init__(self, url: str | None, timeout_s: float = 1.0) -> None:
        self.url = url.rstrip("/") + "/metrics" if url else None
        self.timeout_s = timeout_s
        self.readings: list[CacheReading] = []
        self.note: str | None = (
            None if url else "no predictor address given (--predictor-url): cache not shown"
        )
        self._last: tuple[float, float] | None = None

    def scrape(self, now_ms: int) -> CacheReading | None:
        if self.url is None:
            return None
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        try:
            text = httpx.get(self.url, timeout=self.timeout_s).text
        except httpx.HTTPError as exc:
            self.note = f"the predictor's /metrics did not answer ({type(exc).__name__})"
            return None
        hits = misses = 0.0
        found = False
        for family in text_string_to_metric_families(text):
            if "cache" not in family.name:
                continue
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                name = sample.name.lower()
                outcome = " ".join(str(v).lower() for v in sample.labels.values())
                if "hit" in name or outcome.startswith("hit") or " hit" in outcome:
                    hits += sample.value
                    found = True
                elif "miss" in name or "miss" in outcome:
                    misses += sample.value
                    found = True
        if not found:
            self.note = "the predictor exposes no cache metrics: it serves without a cache"
            return None
        self.note = None
        previous = self._last or (0.0, 0.0)
        self._last = (hits, misses)
        delta_hits, delta_misses = hits - previous[0], misses - previous[1]
        lookups = delta_hits + delta_misses
        reading = CacheReading(
            now_ms, delta_hits / lookups if lookups > 0 else None, delta_hits, delta_misses
        )
        self.readings = [*self.readings[-499:], reading]
        return reading
