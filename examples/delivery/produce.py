"""`sluice produce`: synthetic delivery traffic to the raw topics and/or parquet history."""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from core.kafka import CountingProducer, ensure_topics
from core.settings import Settings
from events.history import SourceEvent, write_history
from examples.delivery.simulate import DEFAULT_CITY, DeliverySimulator, corrupt, realtime_intensity
from examples.delivery.sources import SOURCES, SOURCES_BY_NAME

log = logging.getLogger("sluice.produce")


@dataclass
class ProduceReport:
    events: int = 0
    corrupted: int = 0
    by_source: Counter[str] = field(default_factory=Counter)
    expected_rejections: Counter[str] = field(default_factory=Counter)
    history_rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    first_event_ms: int = 0
    last_event_ms: int = 0

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def _live(events: Iterator[SourceEvent]) -> Iterator[SourceEvent]:
    """Release each event when the wall clock reaches its event time."""
    for event in events:
        delay = event.event_time_ms / 1000 - time.time()
        if delay > 0:
            time.sleep(delay)
        yield event


def calibrated_intensity(seed: int, start_ms: int, target_per_s: float) -> float:
    """Intensity that makes the simulated city emit ~target_per_s events around start_ms.

    Measured over the ten simulated minutes before the start, after an hour of warm-up (so
    deliveries are flowing), rather than as a daily mean: a live run at night is then as
    fast as one at noon.
    """
    window_ms, warmup_ms = 600_000, 3_600_000
    simulator = DeliverySimulator(seed=seed, start_ms=start_ms - warmup_ms - window_ms)
    natural = 0
    for event in simulator.events():
        if event.event_time_ms >= start_ms:
            break
        natural += event.event_time_ms >= start_ms - window_ms
    return target_per_s / max(natural / (window_ms / 1000), 1e-9)


def default_history_start_ms(n_events: int = 0, now_s: float | None = None) -> int:
    """A midnight (UTC) early enough that n_events of simulated history all lie in the past.

    At least yesterday 00:00; earlier when the events span more than that at the city's daily
    mean rate (with a margin for busy days), so the validator never sees future events.
    """
    now = datetime.fromtimestamp(time.time() if now_s is None else now_s, UTC)
    mean_rate = 1.0 / realtime_intensity(DEFAULT_CITY, 1.0)
    span = timedelta(seconds=1.3 * n_events / mean_rate)
    earliest = (now - span - timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return int(earliest.timestamp() * 1000)


def produce_synthetic(
    settings: Settings,
    n_events: int,
    *,
    seed: int = 7,
    start_ms: int | None = None,
    rate: float | None = None,
    corrupt_fraction: float = 0.0,
    to_kafka: bool = True,
    history_dir: Path | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> ProduceReport:
    """Generate n_events of delivery traffic; publish raw JSON and/or write parquet history.

    With rate (events/s), the run is live: it starts now and events are released at their
    event time, the city's intensity calibrated to the rate. Without, it runs as fast as
    possible over simulated time from start_ms (default: yesterday 00:00 UTC).
    corrupt_fraction replaces that share of the published events with malformed ones (bad
    JSON, missing fields, wrong types, out-of-range values), so the dead-letter path gets
    exercised; the report says which rejections to expect. History holds the events that were
    published intact, like an archive of the validated event topics: Spark's backfill then
    reads exactly the events the stream job reads, so their rows can be compared one to one.
    """
    intensity = 1.0
    if rate:
        start_ms = int(time.time() * 1000)
        intensity = calibrated_intensity(seed, start_ms, rate)
    elif start_ms is None:
        start_ms = default_history_start_ms(n_events)
    simulator = DeliverySimulator(seed=seed, start_ms=start_ms, intensity=intensity)
    rng = random.Random(seed + 1)
    report = ProduceReport()
    producer = CountingProducer(settings) if to_kafka else None
    if producer is not None:
        ensure_topics(settings, [s.raw_topic for s in SOURCES])

    def published() -> Iterator[SourceEvent]:
        """The event stream, publishing each event to its raw topic on the way through."""
        events = itertools.islice(simulator.events(), n_events)
        for event in _live(events) if rate else events:
            source = SOURCES_BY_NAME[event.source]
            if report.events == 0:
                report.first_event_ms = event.event_time_ms
            report.last_event_ms = event.event_time_ms
            report.events += 1
            report.by_source[event.source] += 1
            intact = True
            if producer is not None:
                if corrupt_fraction and rng.random() < corrupt_fraction:
                    value, reason, _field = corrupt(rng, source, event.payload)
                    report.corrupted += 1
                    report.expected_rejections[reason.value] += 1
                    intact = False
                else:
                    value = orjson.dumps(event.payload)
                producer.produce(source.raw_topic, value, event.key, event.event_time_ms)
                if report.events % 10_000 == 0:
                    producer.poll(0)
            if on_progress is not None and report.events % 5_000 == 0:
                on_progress(report.events)
            if intact:
                yield event

    started = time.monotonic()
    if history_dir is not None:
        # One streaming write: history is written in batches while events are published.
        report.history_rows = write_history(published(), history_dir, SOURCES)
    else:
        for _ in published():
            pass
    if producer is not None:
        producer.flush()
    report.seconds = time.monotonic() - started
    if on_progress is not None:
        on_progress(report.events)
    log.info("produced", extra={"events": report.events, "rate": round(report.rate)})
    return report
