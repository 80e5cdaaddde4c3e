"""Prediction and feedback records to Kafka, off the request path, counted from queue to ack.

The records are core.records types (PredictionRecord, FeedbackRecord), encoded by the caller;
this module moves bytes.

``send`` only appends to a bounded in-memory queue and returns at once; one background thread
hands records to the confluent-kafka producer and serves its delivery reports. Each record's
fate is counted (see LogCounts):

- delivered: the broker acknowledged it;
- retried: a delivery failed (after librdkafka's own retries within delivery.timeout.ms) and
  the record was queued again, with backoff, up to ``retries`` times;
- failed: still undelivered after that; logged at ERROR with its key, never silently;
- dropped: the in-memory queue was full when the request tried to log (a broker down for long
  enough to fill ``max_queue`` records); logged at WARNING. Requests never wait on the broker,
  so this is the one place a record can be lost, and it is counted and exposed in /metrics.

``close`` stops taking records, delivers what is queued and flushes the producer.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("sluice.serving.log")
RETRY_BACKOFF_S = 0.2
_MAX_BACKOFF_S = 10.0


class ProducerLike(Protocol):
    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Any) -> Any: ...
    def poll(self, timeout: float) -> int: ...
    def flush(self, timeout: float) -> int: ...


@dataclass
class LogCounts:
    produced: int = 0  # handed to the producer (each retry counts again)
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    dropped: int = 0

    @property
    def pending(self) -> int:
        """Records handed over without an outcome yet (delivered, retried or failed)."""
        return self.produced - self.delivered - self.retried - self.failed


@dataclass
class _Record:
    topic: str
    key: bytes
    value: bytes
    attempts: int = 0
    due: float = 0.0


class KafkaLog:
    """Non-blocking, counted, retrying delivery of records to Kafka topics."""

    def __init__(
        self,
        producer: ProducerLike,
        *,
        max_queue: int = 100_000,
        retries: int = 5,
        on_outcome: Callable[[str, str], None] | None = None,
        retry_backoff_s: float = RETRY_BACKOFF_S,
    ) -> None:
        self._producer = producer
        self._queue: queue.Queue[_Record] = queue.Queue(max_queue)
        self._retries = retries
        self._retry_backoff_s = retry_backoff_s
        self._due: deque[_Record] = deque()  # touched by the worker thread only
        self._on_outcome = on_outcome
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # counts are written by the worker and by send()
        self.counts = LogCounts()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sluice-kafka-log", daemon=True)
            self._thread.start()

    def _count(self, outcome: str, topic: str) -> None:
        with self._lock:
            setattr(self.counts, outcome, getattr(self.counts, outcome) + 1)
        if self._on_outcome is not None:
            self._on_outcome(outcome, topic)

    def send(self, topic: str, key: bytes, value: bytes) -> bool:
        """Queue a record; False (and counted as dropped) when the queue is full."""
        if self._stop.is_set():
            log.error("record logged after close", extra={"topic": topic, "key": key.decode()})
            self._count("dropped", topic)
            return False
        try:
            self._queue.put_nowait(_Record(topic, key, value))
            return True
        except queue.Full:
            self._count("dropped", topic)
            log.warning("log queue full, record dropped", extra={"topic": topic})
            return False

    def _delivery(self, record: _Record) -> Callable[[Any, Any], None]:
        def report(err: Any, _msg: Any) -> None:
            if err is None:
                self._count("delivered", record.topic)
                return
            if record.attempts <= self._retries:
                self._count("retried", record.topic)
                backoff = min(_MAX_BACKOFF_S, self._retry_backoff_s * 2 ** (record.attempts - 1))
                record.due = time.monotonic() + backoff
                self._due.append(record)
                return
            self._count("failed", record.topic)
            log.error(
                "record not delivered",
                extra={"topic": record.topic, "key": record.key.decode(), "error": str(err)},
            )

        return report

    def _hand_over(self, record: _Record) -> None:
        record.attempts += 1
        while True:
            try:
                self._producer.produce(
                    record.topic,
                    value=record.value,
                    key=record.key,
                    on_delivery=self._delivery(record),
                )
                break
            except BufferError:  # librdkafka's own queue is full: serve reports, then retry
                self._producer.poll(0.05)
        self._count("produced", record.topic)

    def _run(self) -> None:
        while True:
            handed = 0
            now = time.monotonic()
            for _ in range(len(self._due)):
                record = self._due.popleft()
                if record.due <= now:
                    self._hand_over(record)
                    handed += 1
                else:
                    self._due.append(record)
            while handed < 1000:
                try:
                    record = self._queue.get_nowait()
                except queue.Empty:
                    break
                self._hand_over(record)
                handed += 1
            self._producer.poll(0 if handed else 0.01)
            if self._stop.is_set() and self._idle():
                return

    def _idle(self) -> bool:
        return self._queue.empty() and not self._due and self.counts.pending == 0

    def close(self, timeout_s: float = 30.0) -> LogCounts:
        """Deliver everything queued (within timeout_s), then stop the worker."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("log not drained at close", extra={"pending": self.counts.pending})
        with contextlib.suppress(Exception):
            self._producer.flush(1.0)
        if self._thread is None or not self._thread.is_alive():
            # Drop the client so librdkafka's threads and connections go now, not at exit.
            self._producer = _ClosedProducer()
        return self.counts


class _ClosedProducer:
    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Any) -> Any:
        raise RuntimeError("the log is closed")

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        return 0


def kafka_producer(settings: Any) -> ProducerLike:
    """A confluent-kafka producer for the log, with the project's producer defaults."""
    from confluent_kafka import Producer

    from core.kafka import PRODUCER_DEFAULTS

    # Short linger: log records should reach monitoring within milliseconds, not batch for 20.
    config = settings.kafka_client_config(**(PRODUCER_DEFAULTS | {"linger.ms": 5}))
    producer: Any = Producer(config)  # its stub types callbacks more narrowly than ProducerLike
    return producer  # type: ignore[no-any-return]
