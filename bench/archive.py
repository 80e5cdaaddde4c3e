"""Benchmark: `sluice archive` throughput against a bare consumer of the same topics, same run.

Starts its own broker and Redis on free loopback ports, publishes N canonical events to the
events topics (as ingest would), then reads all of them with:
  - the archiver (events/archive.py: consume, JSON -> typed columns, md5 ids, parquet parts
    per (source, day, partition), fsync and rename, offsets in the names), timed from its first
    record to its last flush;
  - a bare confluent-kafka consumer (assign at the beginning, touch each value), timed from its
    first record to its last.
Each runs twice, alternating; the best run of each counts. The ratio is archive / bare (1.0 =
as fast as reading). Run: `python -m bench.archive [--events N]`.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from core.kafka import PRODUCER_DEFAULTS, ensure_topics
from core.settings import Settings, load_settings
from events.archive import run_archive
from examples.delivery.produce import default_history_start_ms
from examples.delivery.simulate import DeliverySimulator
from examples.delivery.sources import SOURCES, SOURCES_BY_NAME
from features.validation import EventValidator, ValidEvent
from infra.stack import free_port, stack_down, stack_up


def publish(settings: Settings, n: int) -> None:
    """n simulated events, validated and published as ingest publishes them."""
    validators = {name: EventValidator(s) for name, s in SOURCES_BY_NAME.items()}
    producer = Producer(settings.kafka_client_config(**PRODUCER_DEFAULTS))
    simulator = DeliverySimulator(seed=5, start_ms=default_history_start_ms(n))
    now_ms = int(time.time() * 1000)
    for event in itertools.islice(simulator.events(), n):
        valid = validators[event.source].validate(event.to_json(), now_ms)
        assert isinstance(valid, ValidEvent), valid
        topic = SOURCES_BY_NAME[event.source].topic
        while True:
            try:
                producer.produce(
                    topic, valid.to_json(), valid.key.encode(), timestamp=valid.event_time_ms
                )
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120):
        raise RuntimeError("not every event was delivered")


def bare_read(settings: Settings, topics: list[str], n: int) -> float:
    """Seconds from the first record to the n-th for a bare consumer assigned at the start."""
    consumer = Consumer(
        settings.kafka_client_config(**{"group.id": "bench-bare", "enable.auto.commit": False})
    )
    metadata = consumer.list_topics(timeout=10)
    consumer.assign(
        [
            TopicPartition(topic, p, OFFSET_BEGINNING)
            for topic in topics
            for p in metadata.topics[topic].partitions
        ]
    )
    read = 0
    size = 0
    first = 0.0
    deadline = time.monotonic() + 300
    try:
        while read < n and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=1000, timeout=0.2):
                if msg.error():
                    continue
                first = first or time.perf_counter()
                size += len(msg.value() or b"")
                read += 1
        if read < n:
            raise RuntimeError(f"the bare consumer read {read} of {n}")
        return time.perf_counter() - first
    finally:
        consumer.close()


def archive_once(settings: Settings, n: int, fsync: bool) -> tuple[float, int]:
    """(seconds, parts) of one archive of the n events into a fresh history directory."""
    shutil.rmtree(settings.history_dir, ignore_errors=True)
    counts = run_archive(settings, SOURCES, max_events=n, fsync=fsync)
    if counts.archived != n or not counts.balanced():
        raise RuntimeError(f"archived {counts.archived} of {n}: {counts}")
    return counts.busy_seconds, counts.parts


def run(settings: Settings, n: int) -> None:
    topics = [s.topic for s in SOURCES]
    ensure_topics(settings, [*topics, settings.dead_letter_topic])
    began = time.perf_counter()
    publish(settings, n)
    print(f"published {n:,} events in {time.perf_counter() - began:.1f} s")
    bare: list[float] = []
    archived: list[float] = []
    unsynced: list[float] = []
    parts = 0
    for _ in range(2):
        bare.append(bare_read(settings, topics, n))
        seconds, parts = archive_once(settings, n, fsync=True)
        archived.append(seconds)
        unsynced.append(archive_once(settings, n, fsync=False)[0])
    base = n / min(bare)
    print(f"\n{n:,} events, {len(topics)} topics x {settings.topic_partitions} partitions, Tansu")
    print(f"{'measure':40} {'events/s':>12} {'ratio':>7}")
    print(f"{'bare consumer (baseline)':40} {base:12,.0f} {1.0:7.2f}")
    for name, runs in (("archive (fsync, default)", archived), ("archive (no fsync)", unsynced)):
        rate = n / min(runs)
        print(f"{name:40} {rate:12,.0f} {rate / base:7.2f}")
    print(f"parts per archive run: {parts} (flush every 10,000 records or 5 s per partition)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            kafka_bootstrap=f"127.0.0.1:{free_port()}",
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
            state_dir=Path(tmp) / "state",
            history_dir=Path(tmp) / "history",
        )
        stack_up(settings)
        try:
            run(settings, args.events)
        finally:
            stack_down(settings)


if __name__ == "__main__":
    main()
