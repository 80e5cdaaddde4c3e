"""`sluice archive` against a real broker: killed with SIGKILL mid-run, restarted, stopped with
SIGTERM, and every event of the topics is archived exactly once (counted by offsets); a
replayed event is removed by its identity, late marks leave out per view what the stream did
not count, in read_history and in the Spark reader.

This module doubles as the archiver's definitions module (SLUICE_DEFINITIONS_MODULE): its
top-level sources are the example's, on topics of their own, so no other test's records mix in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Producer

from core.kafka import ensure_topics
from core.records import DeadLetter
from core.settings import Settings
from events.history import OFFSET, PARTITION, TOPIC, read_history, recover
from events.identity import event_id
from examples.delivery import sources as examples
from examples.delivery.simulate import CityConfig, DeliverySimulator
from features.validation import EventValidator, ValidEvent

pytestmark = pytest.mark.integration

TAG = "archive-it"
DEAD_LETTER_TOPIC = f"{TAG}.dead-letter"
DEFINITIONS = "tests.integration.test_archive_broker"  # pytest may name it differently
# The definitions (module attributes): the example's sources on topics of their own.
orders = examples.ORDERS.model_copy(
    update={"topic": f"{TAG}.events.orders", "raw_topic": f"{TAG}.raw.orders"}
)
courier_pings = examples.COURIER_PINGS.model_copy(
    update={"topic": f"{TAG}.events.courier_pings", "raw_topic": f"{TAG}.raw.courier_pings"}
)
deliveries = examples.DELIVERIES.model_copy(
    update={"topic": f"{TAG}.events.deliveries", "raw_topic": f"{TAG}.raw.deliveries"}
)
ARCHIVED = (orders, courier_pings, deliveries)
# Two simulated cities a day apart, interleaved: most flushes write a part to each of two
# days, so that a kill can land between the renames of one flush.
STARTS_MS = (1_789_977_600_000, 1_790_064_000_000)  # 2026-09-21 and -22, 08:00 UTC
CITY = CityConfig(n_restaurants=40, n_couriers=30, peak_orders_per_minute=30)
REPO = Path(__file__).resolve().parents[2]
SLUICE = str(Path(sys.executable).parent / "sluice")
Delivered = tuple[str, int, int, bytes]  # topic, partition, offset, value


class Publisher:
    """Publishes canonical events as ingest does and remembers where each landed."""

    def __init__(self, settings: Settings) -> None:
        self.producer = Producer(settings.kafka_client_config(**{"linger.ms": 20}))
        self.delivered: list[Delivered] = []
        self.failed = 0

    def _report(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed += 1
        else:
            self.delivered.append((msg.topic(), msg.partition(), msg.offset(), msg.value()))

    def publish(
        self, topic: str, value: bytes, key: bytes | None, ts: int, headers: Any = None
    ) -> None:
        self.producer.produce(
            topic, value, key, timestamp=ts, headers=headers, on_delivery=self._report
        )
        self.producer.poll(0)

    def flush(self) -> list[Delivered]:
        assert self.producer.flush(30) == 0
        assert self.failed == 0
        return self.delivered


def canonical(n: int, seed: int) -> list[tuple[str, ValidEvent]]:
    """(topic, event) of n simulated events, validated as ingest validates them."""
    by_name = {s.name: (s, EventValidator(s)) for s in ARCHIVED}
    cities = [
        DeliverySimulator(seed=seed + i, start_ms=start, city=CITY).events()
        for i, start in enumerate(STARTS_MS)
    ]
    out = []
    for event in islice(chain.from_iterable(zip(*cities, strict=False)), n):
        source, validator = by_name[event.source]
        valid = validator.validate(event.to_json(), 2**50)
        assert isinstance(valid, ValidEvent)
        out.append((source.topic, valid))
    return out


def publish_events(publisher: Publisher, events: list[tuple[str, ValidEvent]]) -> None:
    for topic, event in events:
        publisher.publish(topic, event.to_json(), event.key.encode(), event.event_time_ms)


def run_env(settings: Settings) -> dict[str, str]:
    return os.environ | {
        "SLUICE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "SLUICE_REDIS_URL": settings.redis_url,
        "SLUICE_STATE_DIR": str(settings.state_dir),
        "SLUICE_HISTORY_DIR": str(settings.history_dir),
        "SLUICE_DEAD_LETTER_TOPIC": DEAD_LETTER_TOPIC,
        "SLUICE_DEFINITIONS_MODULE": DEFINITIONS,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }


RUNNING: list[subprocess.Popen[bytes]] = []


def start(settings: Settings, log: Path, *options: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [SLUICE, "--log-level", "INFO", "archive", *options],
            cwd=REPO,
            env=run_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    RUNNING.append(proc)
    return proc


def wait_for(proc: subprocess.Popen[bytes], log: Path, check: Any, what: str) -> None:
    deadline = time.monotonic() + 60
    while not check():
        if proc.poll() is not None:
            raise AssertionError(
                f"the archiver exited ({proc.returncode}) before {what}: {log.read_text()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {log.read_text()}")
        time.sleep(0.02)


def archived_offsets(root: Path) -> Counter[tuple[str, int, int]]:
    found: Counter[tuple[str, int, int]] = Counter()
    for source in ARCHIVED:
        for path in (root / source.name).glob("date=*/part-*.parquet"):
            table = pq.read_table(path, columns=[TOPIC, PARTITION, OFFSET])
            found.update(
                zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True)
            )
    return found


@dataclass
class Archived:
    settings: Settings
    delivered: list[Delivered]  # every record of the events topics
    duplicate: Delivered  # the second copy of a replayed event
    late: dict[str, set[tuple[str, int, int]]]  # view -> offsets the "stream" marked late
    logs: dict[str, str]


@pytest.fixture(scope="module")
def archived(
    stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Archived]:
    tmp = tmp_path_factory.mktemp("archive")
    settings = stack_settings.model_copy(
        update={
            "history_dir": tmp / "history",
            "dead_letter_topic": DEAD_LETTER_TOPIC,
            "definitions_module": DEFINITIONS,
        }
    )
    try:
        yield scenario(settings, tmp)
    finally:
        for proc in RUNNING:  # a failed scenario leaves no archiver behind
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def scenario(settings: Settings, tmp: Path) -> Archived:
    """Two SIGKILLs mid-run, a replay, late marks, a SIGTERM with records buffered, an idle run."""
    ensure_topics(settings, [s.topic for s in ARCHIVED] + [DEAD_LETTER_TOPIC])
    publisher = Publisher(settings)
    first, second = canonical(9_000, seed=11)[:6_000], canonical(9_000, seed=11)[6_000:]
    publish_events(publisher, first)
    publisher.flush()
    logs: dict[str, str] = {}

    # Run 1 and 2: SIGKILL while parts are being written (10 records a flush: ~600 flushes).
    for run in ("kill-1", "kill-2"):
        log = tmp / f"{run}.log"
        before = sum(recover(settings.history_dir, clean=False).next_offsets.values())
        proc = start(settings, log, "--flush-records", "10", "--flush-seconds", "30")
        wait_for(
            proc,
            log,
            lambda b=before: (
                sum(recover(settings.history_dir, clean=False).next_offsets.values()) >= b + 300
            ),
            f"{run}: parts",
        )
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        logs[run] = log.read_text()
    assert sum(recover(settings.history_dir, clean=False).next_offsets.values()) < len(first), (
        "the archiver finished before it was killed: nothing was tested"
    )

    # Meanwhile ingest replays an event (an at-least-once redelivery: same bytes, later
    # offset), more events arrive, and the stream dead-letters events as late for views.
    publish_events(publisher, second)
    replayed = [e for t, e in first if t == orders.topic][50].to_json()
    publisher.publish(
        orders.topic,
        replayed,
        orjson.loads(replayed)["restaurant_id"].encode(),
        orjson.loads(replayed)["placed_at"],
    )
    delivered = publisher.flush()
    duplicate = max(d for d in delivered if d[3] == replayed)
    order_records = [d for d in delivered if d[0] == orders.topic]
    late = {
        "restaurant_orders": {d[:3] for d in order_records[10:20]} | {duplicate[:3]},
        "zone_orders": {d[:3] for d in order_records[15:25]},
    }
    for view, marked in late.items():
        for topic, partition, offset in sorted(marked):
            value = next(d[3] for d in delivered if d[:3] == (topic, partition, offset))
            letter = DeadLetter(
                reason="late",
                field="placed_at",
                error="too late",
                source="orders",
                source_topic=topic,
                partition=partition,
                offset=offset,
                view=view,
            )
            publisher.publish(DEAD_LETTER_TOPIC, value, None, 0, letter.to_headers())
    for i in range(7):  # invalid events from ingest: not events, skipped
        letter = DeadLetter("wrong_type", "items", "bad", "orders", orders.raw_topic, 0, i)
        publisher.publish(DEAD_LETTER_TOPIC, b'{"items": "x"}', None, 0, letter.to_headers())
    publisher.flush()

    # Run 3: SIGTERM with records still buffered (no flush is due for a minute): it flushes.
    log = tmp / "term.log"
    proc = start(settings, log, "--flush-records", "1000000", "--flush-seconds", "60")
    wait_for(proc, log, lambda: "archive started" in log.read_text(), "run 3 to start")
    # Counted once started: the start undid what the kill left half written.
    before_term = len(archived_offsets(settings.history_dir))
    time.sleep(3.0)  # it reads everything within a second; nothing is flushed before the signal
    assert len(archived_offsets(settings.history_dir)) == before_term
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text()
    logs["term"] = log.read_text()
    assert len(archived_offsets(settings.history_dir)) > before_term, "SIGTERM flushed nothing"

    # Run 4: nothing left to do, it exits when idle.
    log = tmp / "idle.log"
    proc = start(settings, log, "--idle-timeout", "2")
    assert proc.wait(60) == 0, log.read_text()
    logs["idle"] = log.read_text()
    events = [d for d in delivered if d[0] != DEAD_LETTER_TOPIC]
    return Archived(settings, events, duplicate, late, logs)


def test_every_event_is_archived_exactly_once_across_kills(archived: Archived) -> None:
    root = archived.settings.history_dir
    found = archived_offsets(root)
    expected = {d[:3] for d in archived.delivered}
    assert len(expected) == 9_001
    assert set(found) == expected, (
        f"missing {len(expected - set(found))}, unexpected {len(set(found) - expected)}"
    )
    duplicated = {k: n for k, n in found.items() if n > 1}
    assert not duplicated, f"archived more than once: {sorted(duplicated)[:5]}"
    # Each row's identity is the md5 of the value at its offset.
    values = {d[:3]: d[3] for d in archived.delivered}
    for source in ARCHIVED:
        for path in (root / source.name).glob("date=*/part-*.parquet"):
            table = pq.read_table(path, columns=[TOPIC, PARTITION, OFFSET, "_event_id"])
            for topic, partition, offset, eid in zip(
                *(table.column(c).to_pylist() for c in table.column_names), strict=True
            ):
                assert eid == event_id(values[(topic, partition, offset)])
    # Nothing half written is left, and the next start resumes after the last offset.
    assert not list(root.rglob(".*.tmp"))
    end = Counter[tuple[str, int]]()
    for topic, partition, offset in expected:
        end[(topic, partition)] = max(end[(topic, partition)], offset + 1)
    resume = recover(root, clean=False).next_offsets
    assert {k: v for k, v in resume.items() if k[0] != DEAD_LETTER_TOPIC} == dict(end)
    # Every run that ended by itself balanced its counts; runs 3 and 4 saw every dead letter.
    finished = {}
    for run in ("term", "idle"):
        assert "(balanced)" in archived.logs[run]
        finished[run] = next(
            orjson.loads(line)
            for line in archived.logs[run].splitlines()
            if '"msg":"archive finished"' in line
        )
    assert sum(f["late_marks"] for f in finished.values()) == sum(
        len(m) for m in archived.late.values()
    )
    assert sum(f["skipped"] for f in finished.values()) == 7


def test_read_history_drops_the_replayed_duplicate_and_marked_events(archived: Archived) -> None:
    root = archived.settings.history_dir
    order_values = [d[3] for d in archived.delivered if d[0] == orders.topic]
    distinct = len(set(order_values))
    assert distinct == len(order_values) - 1  # one replayed event
    table = read_history(root, orders)
    assert table.num_rows == distinct
    assert len(set(table.column("order_id").to_pylist())) == distinct
    for view, marked in archived.late.items():
        # The duplicate's mark names the second copy, which de-duplication already dropped.
        left_out = len(marked - {archived.duplicate[:3]})
        assert read_history(root, orders, view=view).num_rows == distinct - left_out
    assert read_history(root, orders, view="no_such_view").num_rows == distinct
    for source in (courier_pings, deliveries):
        records = sum(1 for d in archived.delivered if d[0] == source.topic)
        assert read_history(root, source).num_rows == records


@pytest.mark.spark
def test_the_spark_reader_agrees(archived: Archived, spark: Any) -> None:
    from batch.history import read_events

    root = archived.settings.history_dir
    order_values = [d[3] for d in archived.delivered if d[0] == orders.topic]
    times = [orjson.loads(v)["placed_at"] for v in order_values]
    lo, hi = min(times), max(times) + 1
    frame, rows = read_events(spark, root, orders, lo, hi)
    assert rows == len(order_values)  # rows in the parts read, copies included
    expected = read_history(root, orders)
    assert frame.count() == expected.num_rows == len(set(order_values))
    assert frame.columns == list(orders.field_names)
    for view in archived.late:
        marked, _ = read_events(spark, root, orders, lo, hi, view=view)
        ids = sorted(r["order_id"] for r in marked.select("order_id").collect())
        assert ids == sorted(read_history(root, orders, view=view).column("order_id").to_pylist())
    # A range that cuts the day keeps only its events.
    middle = sorted(times)[len(times) // 2]
    half, _ = read_events(spark, root, orders, lo, middle)
    assert half.count() == len({v for v, t in zip(order_values, times, strict=True) if t < middle})
