"""bench.stream's freshness run: a live view at a steady rate, seconds from window close to
readable in Redis (and to emitted by the window operator), and from servable time, once the
job serves; and how long it took to serve (start-up, apart)."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import statistics
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from core.kafka import PRODUCER_DEFAULTS, ensure_topics
from core.records import FeatureRow
from core.settings import Settings
from examples.delivery.features import restaurant_orders
from examples.delivery.simulate import DeliverySimulator
from examples.delivery.sources import ORDERS
from feature_repo.online_store import open_online_store
from features.contract import servable_at_ms
from features.definitions import Aggregation, AggregationFunction, FeatureView, Window
from features.validation import EventValidator, ValidEvent
from streaming.compile import features_topic
from streaming.job import JobOptions
from streaming.runner import run as run_stream
from streaming.sinks import now_ms

LIVE_LATENESS = timedelta(seconds=2)


def live_view() -> FeatureView:
    source = ORDERS.model_copy(
        update={"topic": "bench.live.orders", "allowed_lateness": LIVE_LATENESS}
    )
    every_5s = Window.sliding("1m", every="5s")
    return FeatureView(
        name="bench_live_orders",
        entity=restaurant_orders.entity,
        source=source,
        aggregations=(
            Aggregation(function=AggregationFunction.COUNT, windows=(every_5s,)),
            Aggregation(function=AggregationFunction.MEAN, column="subtotal", windows=(every_5s,)),
        ),
        ttl=timedelta(hours=1),
    )


# Windows that close within this long of the first row readable are start-up, not measured.
WARM_UP_MS = 10_000


@dataclasses.dataclass
class Freshness:
    """Seconds, one sample per (entity, window end) once the job serves: from window close to
    readable online and to emitted by the window operator, and from servable time to
    readable; ``start_s``: from the first event produced to the first row readable."""

    readable: list[float] = dataclasses.field(default_factory=list)
    emitted: list[float] = dataclasses.field(default_factory=list)
    servable: list[float] = dataclasses.field(default_factory=list)
    start_s: float | None = None
    # The broker's part, measured by a plain consumer of the same topic in the same run: per
    # record, produced to consumed; per sample, from the close as that consumer saw it (the
    # last partition's closing record consumed) to readable: the job's part.
    delivered: list[float] = dataclasses.field(default_factory=list)
    readable_after_delivery: list[float] = dataclasses.field(default_factory=list)


def freshness(
    settings: Settings,
    rate: float,
    seconds: float,
    options: JobOptions,
    *,
    partitions: int,
    start_ms: int,
) -> Freshness:
    """The live view's freshness (Freshness). Start-up is left out by time since the first
    row was readable, not since the job's submission: the job's first rows (its Python
    worker's first bundle, the producer's first connection) took 2-4 s more than the rest on
    this machine (2026-12-07), 10 s after submission, and one window end is 1% of samples."""
    view = live_view()
    ensure_topics(settings, [view.source.topic], partitions=partitions)
    validator = EventValidator(view.source)
    sim = DeliverySimulator(seed=9, start_ms=start_ms)
    templates = [e.payload for e in itertools.islice(sim.events(), 20_000) if e.source == "orders"]
    keys = sorted({t["restaurant_id"] for t in templates})
    stop = threading.Event()
    stamps: list[list[int]] = [[] for _ in range(partitions)]  # event times per partition
    seen: dict[tuple[str, int], int] = {}  # (entity, end) -> wall ms first readable
    # Per partition, as a plain consumer got them: event times and wall ms consumed.
    consumed_t: list[list[int]] = [[] for _ in range(partitions)]
    consumed_at: list[list[int]] = [[] for _ in range(partitions)]

    def produce() -> None:
        producer = Producer(settings.kafka_client_config(**(PRODUCER_DEFAULTS | {"linger.ms": 2})))
        for i, template in enumerate(itertools.cycle(templates)):
            if stop.is_set():
                break
            t = now_ms()
            valid = validator.validate_object(template | {"placed_at": t}, t + 1000)
            assert isinstance(valid, ValidEvent)
            partition = i % partitions  # known, so the close of a window is known
            producer.produce(
                view.source.topic, valid.to_json(), valid.key, partition=partition, timestamp=t
            )
            stamps[partition].append(t)
            producer.poll(0)
            time.sleep(max(0.0, (i + 1) / rate - (time.monotonic() - began)))
        producer.flush(10)

    def poll_redis() -> None:
        # Patient reads: the predictor's read timeout (100 ms) is a request deadline, and on a
        # loaded machine one read timing out would end the poller (and every sample with it).
        patient = settings.model_copy(update={"redis_read_timeout_ms": 10_000.0})
        with open_online_store(patient) as store:
            while not stop.is_set():
                wall = now_ms()
                for key, row in zip(keys, store.read(view, keys), strict=True):
                    if row is not None:
                        seen.setdefault((key, row.window_end_ms), wall)
                time.sleep(0.01)

    def consume() -> None:
        # The local broker's own delivery, for comparison: Tansu's latency grew with the
        # topic's length (500 events/s, a consumer alone: p50 165 ms in the first 15 s,
        # 1,005 ms after 75 s; 2026-12-07).
        group = f"b-{uuid.uuid4().hex}"
        consumer = Consumer(settings.kafka_client_config(**{"group.id": group}))
        topic = view.source.topic
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        while not stop.is_set():
            for message in consumer.consume(500, timeout=0.1):
                partition = message.partition()
                if message.error() is None and partition is not None:
                    consumed_t[partition].append(message.timestamp()[1])
                    consumed_at[partition].append(now_ms())
        consumer.close()

    began = 0.0
    threads = [threading.Thread(target=f, daemon=True) for f in (produce, poll_redis, consume)]
    began_ms = 0

    def should_stop() -> bool:
        # Called by run() once the job is submitted: traffic starts when the job is up, so
        # no backlog from the JVM's start-up skews the first windows.
        nonlocal began, began_ms
        if not began:
            began = time.monotonic()
            began_ms = now_ms()
            for thread in threads:
                thread.start()
        return time.monotonic() - began > seconds

    run_stream(
        settings,
        [view],
        restore=False,
        report_every_s=15,
        should_stop=should_stop,
        options=options,
    )
    stop.set()
    for thread in threads:
        thread.join(10)
    lateness = int(LIVE_LATENESS.total_seconds() * 1000)
    if not seen:
        return Freshness()
    first_readable_ms = min(seen.values())
    # Windows that closed before the job had served for WARM_UP_MS are left out (start-up).
    first_end = first_readable_ms + WARM_UP_MS - lateness

    # Per partition, (event times, when each arrived): as produced, and as consumed.
    produced = [(times, times) for times in stamps]
    consumed = list(zip(consumed_t, consumed_at, strict=True))

    def since_close(
        end: int, wall: int, arrivals: list[tuple[list[int], list[int]]] = produced
    ) -> float | None:
        """Seconds from the window's close (every partition's first record at or past
        end + lateness arrived) to ``wall``; None before first_end or not closed yet."""
        if end < first_end:
            return None
        closes = []
        for times, arrived in arrivals:
            i = bisect.bisect_left(times, end + lateness)
            if i == len(times):
                return None
            closes.append(arrived[i])
        return (wall - max(closes)) / 1000

    after_delivery = [since_close(end, wall, consumed) for (_, end), wall in seen.items()]
    delivered = [
        (at - t) / 1000
        for times, arrived in consumed
        for t, at in zip(times, arrived, strict=True)
        if t >= first_end
    ]
    readable = [since_close(end, wall) for (_, end), wall in seen.items()]
    servable = [
        (wall - servable_at_ms(view, end)) / 1000
        for (_, end), wall in seen.items()
        if end >= first_end
    ]
    emitted = [
        since_close(row.window_end_ms, row.emitted_at_ms)
        for row in (
            FeatureRow.decode(m.value()) for m in read_all(settings, features_topic(view.name))
        )
    ]
    return Freshness(
        [x for x in readable if x is not None],
        [x for x in emitted if x is not None],
        servable,
        (first_readable_ms - began_ms) / 1000,
        delivered,
        [x for x in after_delivery if x is not None],
    )


def read_all(settings: Settings, topic: str) -> list[Any]:
    consumer = Consumer(settings.kafka_client_config(**{"group.id": f"b-{uuid.uuid4().hex}"}))
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    out, last = [], time.monotonic()
    while time.monotonic() - last < 2:
        batch = [m for m in consumer.consume(1000, timeout=0.2) if m.error() is None]
        if batch:
            out += batch
            last = time.monotonic()
    consumer.close()
    return out


def quantiles_ms(samples: list[float]) -> str:
    if len(samples) < 2:
        return "no samples"
    q = statistics.quantiles(samples, n=100)
    return f"p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms, max {max(samples) * 1000:.0f} ms"
