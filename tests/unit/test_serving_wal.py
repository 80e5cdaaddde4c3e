"""The prediction log's write-ahead file: frames, torn tails, the bound, the lock, segments, and
the log over it: order, retries without end while the broker is away, replay after a restart,
exact counts (also in /metrics)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError
from prometheus_client import CollectorRegistry, generate_latest

from serving.errors import PredictionLogError
from serving.prediction_log import KafkaLog, LogCollector
from serving.wal import WriteAheadLog, encode_frame
from tests.helpers.serving import FakeProducer


def wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


def opened(path: Path, **options: Any) -> WriteAheadLog:
    return WriteAheadLog(path, **options).open()


def balanced(log: KafkaLog) -> bool:
    c = log.counts
    return c.replayed + c.logged == c.delivered + c.failed + c.pending and c.pending >= 0


def test_records_read_back_in_order_across_segments_and_acknowledged_segments_go(tmp_path):
    wal = opened(tmp_path, segment_bytes=4096, fsync_interval_s=0.01)
    for i in range(300):
        assert wal.append("t", f"k{i}".encode(), b"v" * 50)
    assert len(list(tmp_path.glob("*.wal"))) > 3
    entries = wal.read(wal.committed, 1000)
    assert [e.key for e in entries] == [f"k{i}".encode() for i in range(300)]
    assert entries[-1].end == wal.end
    wal.commit(entries[200].offset)
    wal.sync()
    segments = sorted(tmp_path.glob("*.wal"))
    assert int(segments[0].stem) <= entries[200].offset  # the one holding record 200 stays
    assert int(segments[1].stem) > entries[200].offset
    wal.close()
    again = opened(tmp_path)
    assert again.recovered == {"t": 100}  # exactly the unacknowledged ones
    assert again.read(again.committed, 1)[0].key == b"k200"
    again.close()


def test_a_torn_tail_is_cut_not_replayed(tmp_path):
    wal = opened(tmp_path)
    for i in range(10):
        wal.append("t", f"k{i}".encode(), b"value")
    wal.close()
    (segment,) = tmp_path.glob("*.wal")
    whole = segment.stat().st_size
    frame = encode_frame("t", b"k10", b"value")
    with open(segment, "ab") as fh:
        fh.write(frame[: len(frame) // 2])  # a write cut by kill -9 / power loss
    again = opened(tmp_path)
    assert again.recovered == {"t": 10}
    assert again.truncated_bytes == len(frame) // 2
    assert segment.stat().st_size == whole
    assert again.append("t", b"k11", b"after")  # appends go on from a frame boundary
    assert [e.key for e in again.read(0, 100)][-2:] == [b"k9", b"k11"]
    again.close()


def test_a_corrupt_frame_ends_the_log_there(tmp_path):
    wal = opened(tmp_path)
    for i in range(10):
        wal.append("t", f"k{i}".encode(), b"value")
    offset_of_5 = wal.read(0, 10)[5].offset
    wal.close()
    (segment,) = tmp_path.glob("*.wal")
    with open(segment, "r+b") as fh:
        fh.seek(offset_of_5 + 12)
        fh.write(b"\xff")  # a flipped byte inside record 5: its CRC no longer matches
    again = opened(tmp_path)
    assert again.recovered == {"t": 5}
    assert [e.key for e in again.read(0, 100)] == [f"k{i}".encode() for i in range(5)]
    again.close()


def test_a_full_log_refuses_instead_of_blocking(tmp_path):
    wal = opened(tmp_path, max_bytes=2048, segment_bytes=1024)
    frame = len(encode_frame("t", b"k", b"x" * 100))
    accepted = [wal.append("t", b"k", b"x" * 100) for _ in range(40)]
    assert sum(accepted) == 2048 // frame
    assert accepted == sorted(accepted, reverse=True)  # refused only once full
    assert wal.disk_bytes <= 2048
    wal.commit(wal.end)  # everything acknowledged: the space comes back at the next sync
    wal.sync()
    assert wal.append("t", b"k", b"x" * 100)
    wal.close()


def test_a_second_process_cannot_share_the_directory(tmp_path):
    wal = opened(tmp_path)
    with pytest.raises(PredictionLogError, match=rf"in use by another process \(pid {os.getpid()}"):
        opened(tmp_path)
    wal.close()
    opened(tmp_path).close()  # released at close


def test_fsync_follows_appends_within_the_interval(tmp_path):
    wal = opened(tmp_path, fsync_interval_s=0.02)
    wal.append("t", b"k", b"v")
    wait_for(lambda: wal.synced == wal.end, 1.0)
    wal.close()
    every = opened(tmp_path / "every", fsync_interval_s=0)
    every.append("t", b"k", b"v")
    assert every.synced == every.end  # synced before append returned
    every.close()


def test_a_broker_away_fails_nothing_and_order_is_kept(tmp_path):
    producer = FakeProducer(failures=10**9)  # timeouts: the broker does not answer
    log = KafkaLog(producer, opened(tmp_path), retries=0, retry_backoff_s=0.001)
    log.start()
    for i in range(20):
        assert log.send("preds", f"k{i:02d}".encode(), b"{}")
        assert balanced(log)
    wait_for(lambda: log.counts.retried >= 60)  # three rounds of timeouts, none failed
    assert (log.counts.failed, log.counts.pending) == (0, 20)
    assert balanced(log)
    producer.down = True
    time.sleep(0.05)  # a poll under way finishes its batch
    producer.failures, producer.down = 0, False  # the broker is back
    counts = log.close()
    assert (counts.logged, counts.delivered, counts.failed, counts.dropped) == (20, 20, 0, 0)
    assert counts.pending == 0
    assert [m.key() for m in producer.delivered] == [f"k{i:02d}".encode() for i in range(20)]


def test_records_the_broker_refuses_are_counted_failed_after_the_retries(tmp_path):
    refused = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
    producer = FakeProducer(failures=100, error=refused)
    log = KafkaLog(producer, opened(tmp_path), retries=2, retry_backoff_s=0.001)
    log.start()
    log.send("preds", b"doomed", b"{}")
    wait_for(lambda: log.counts.failed == 1)
    counts = log.close()
    assert (counts.retried, counts.failed, counts.delivered, counts.pending) == (2, 1, 0, 0)


def test_undelivered_records_are_replayed_first_after_a_restart(tmp_path):
    producer = FakeProducer()
    producer.down = True
    first = KafkaLog(producer, opened(tmp_path))
    first.start()
    for i in range(5):
        first.send("preds", f"old{i}".encode(), b"{}")
    counts = first.close(timeout_s=0.2)  # the broker never answered: all stay on disk
    assert (counts.logged, counts.delivered, counts.pending) == (5, 0, 5)

    producer = FakeProducer()
    second = KafkaLog(producer, opened(tmp_path))
    assert second.counts.replayed == 5
    second.send("preds", b"new", b"{}")
    second.start()
    counts = second.close()
    assert (counts.replayed, counts.logged, counts.delivered, counts.pending) == (5, 1, 6, 0)
    assert [m.key() for m in producer.delivered] == [
        b"old0",
        b"old1",
        b"old2",
        b"old3",
        b"old4",
        b"new",
    ]
    third = KafkaLog(FakeProducer(), opened(tmp_path))  # all acknowledged: nothing replayed
    assert third.counts.replayed == 0
    third.close()


def test_records_wait_on_disk_until_the_topics_can_be_created(tmp_path):
    attempts = []

    def prepare() -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise RuntimeError("broker down")

    producer = FakeProducer()
    log = KafkaLog(producer, opened(tmp_path), prepare=prepare, retry_backoff_s=0.01)
    log.start()
    log.send("preds", b"k", b"{}")
    assert log.summary()["spilling"] is True
    wait_for(lambda: log.counts.delivered == 1)
    assert len(attempts) == 3
    log.close()


def test_a_full_log_drops_and_counts_and_metrics_say_so(tmp_path):
    log = KafkaLog(FakeProducer(), opened(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16))
    value = b"x" * 100_000
    sent = [log.send("preds", b"k", value) for _ in range(15)]  # not started: nothing drains
    assert sent == [True] * 10 + [False] * 5
    registry = CollectorRegistry()
    registry.register(LogCollector(log))
    text = generate_latest(registry).decode()
    assert 'sluice_log_records_total{outcome="logged",topic="preds"} 10.0' in text
    assert 'sluice_log_records_total{outcome="dropped",topic="preds"} 5.0' in text
    assert "sluice_log_pending_records 10.0" in text
    log.start()
    counts = log.close()
    assert (counts.logged, counts.dropped, counts.delivered, counts.pending) == (10, 5, 10, 0)
    assert "sluice_log_pending_records 0.0" in generate_latest(registry).decode()
