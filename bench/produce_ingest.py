"""Benchmark: producing and ingesting events on the local broker, against same-run baselines.

Starts its own broker and Redis on free loopback ports, then measures:
  1. produce: `sluice produce` (simulate + serialize + publish) vs publishing pre-serialized
     bytes with a bare confluent-kafka producer (the broker-bound ceiling);
  2. validation alone: EventValidator vs bare orjson.loads of the same bytes;
  3. ingest: the validating ingest (consume, validate, route, publish, commit) vs a bare
     consume-and-republish copy of the same records with no validation (both timed from the
     first record, so the consumer group's join is not counted).
Ratios are Sluice / baseline (1.0 = as fast as the baseline). Run: `make bench`.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson
from confluent_kafka import Consumer, Producer

from core.kafka import PRODUCER_DEFAULTS, ensure_topics
from core.settings import Settings, load_settings
from events.ingest import run_ingest
from examples.delivery.produce import default_history_start_ms, produce_synthetic
from examples.delivery.simulate import DeliverySimulator
from examples.delivery.sources import SOURCES, SOURCES_BY_NAME
from features.validation import EventValidator
from infra.stack import free_port, stack_down, stack_up


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    started = time.perf_counter()
    count = fn()
    return count, time.perf_counter() - started


def bare_produce(settings: Settings, payloads: list[tuple[str, bytes, bytes]]) -> int:
    producer = Producer(settings.kafka_client_config(**PRODUCER_DEFAULTS))
    for topic, key, value in payloads:
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(60):
        raise RuntimeError("baseline producer did not deliver everything")
    return len(payloads)


def bare_copy(settings: Settings, topics: list[str], target: str, n: int) -> tuple[int, float]:
    """Consume and republish with no validation; seconds from the first record (no join)."""
    consumer = Consumer(
        settings.kafka_client_config(
            **{
                "group.id": "bench-copy",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "session.timeout.ms": 6000,
            }
        )
    )
    producer = Producer(settings.kafka_client_config(**PRODUCER_DEFAULTS))
    consumer.subscribe(topics)
    copied = 0
    first = 0.0
    deadline = time.monotonic() + 120
    while copied < n and time.monotonic() < deadline:
        for msg in consumer.consume(num_messages=1000, timeout=0.2):
            if msg.error():
                continue
            first = first or time.perf_counter()
            while True:
                try:
                    producer.produce(target, value=msg.value(), key=msg.key())
                    break
                except BufferError:
                    producer.poll(0.05)
            copied += 1
    producer.flush(60)
    consumer.commit(asynchronous=False)
    seconds = time.perf_counter() - first
    consumer.close()
    return copied, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    n = args.events
    with tempfile.TemporaryDirectory() as state:
        settings = load_settings(
            kafka_bootstrap=f"127.0.0.1:{free_port()}",
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
            state_dir=Path(state),
        )
        stack_up(settings)
        try:
            run(settings, n)
        finally:
            stack_down(settings)


def run(settings: Settings, n: int) -> None:
    rows: list[tuple[str, float, float]] = []
    start_ms = default_history_start_ms()
    events = list(itertools.islice(DeliverySimulator(seed=1, start_ms=start_ms).events(), n))
    payloads = [("bench.bare." + e.source, e.key.encode(), orjson.dumps(e.payload)) for e in events]
    ensure_topics(settings, {t for t, _, _ in payloads} | {"bench.copy"})

    count, base_s = timed(lambda: bare_produce(settings, payloads))
    report = produce_synthetic(settings, n, seed=1, start_ms=start_ms)
    rows.append(("produce (msgs/s)", report.events / report.seconds, count / base_s))

    validators = {name: EventValidator(s) for name, s in SOURCES_BY_NAME.items()}
    raw = [(validators[e.source], p[2]) for e, p in zip(events, payloads, strict=True)]
    now_ms = int(time.time() * 1000)
    _, valid_s = timed(lambda: len([v.validate(b, now_ms) for v, b in raw]))
    _, parse_s = timed(lambda: len([orjson.loads(b) for _, b in raw]))
    rows.append(("validation only (events/s)", n / valid_s, n / parse_s))

    counts = run_ingest(settings, SOURCES, max_events=n)
    assert counts.received == n, f"ingest saw {counts.received} of {n}"
    ingest_s = counts.busy_seconds
    raw_topics = [s.raw_topic for s in SOURCES]
    copied, copy_s = bare_copy(settings, raw_topics, "bench.copy", n)
    assert copied == n, f"baseline copied {copied} of {n}"
    rows.append(("ingest end to end (events/s)", n / ingest_s, n / copy_s))

    print(f"\n{n} events, local Tansu broker on loopback")
    print(f"{'measure':32} {'sluice':>12} {'baseline':>12} {'ratio':>7}")
    for name, ours, base in rows:
        print(f"{name:32} {ours:12,.0f} {base:12,.0f} {ours / base:7.2f}")


if __name__ == "__main__":
    main()
