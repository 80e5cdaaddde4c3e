"""Prediction and feedback records to Kafka through a local write-ahead log, counted exactly.

The records are core.records types (PredictionRecord, FeedbackRecord), encoded by the caller;
this module moves bytes.

``send`` appends the record to the write-ahead log (serving/wal.py: one ``write()``, no
waiting on the broker) and returns; a background sender reads the log in order, hands records
to an idempotent confluent-kafka producer and advances the log's committed offset as the
broker acknowledges them. So the broker is never on the request path: when it is down or
stopped, records accumulate on local disk (bounded by ``prediction_log_max_bytes``) and are
sent, oldest first, when it answers again; after a restart, whatever the previous process had
not seen acknowledged is sent again before any new record. Durability (what a process or
machine crash can lose) is stated in serving/wal.py.

Every record's fate is counted, per topic (``LogCounts``, exported by ``LogCollector`` as
``sluice_log_records_total{topic,outcome}`` and shown in /health):

- logged: appended to the log by ``send``;
- dropped: refused by ``send``: the log is full (the broker has been away long enough to fill
  ``prediction_log_max_bytes``), its disk failed, or the log is closed. Requests never wait,
  so this is the one place a record is given up on the way in; logged at WARNING;
- replayed: found unacknowledged in the log at start, left by the previous process;
- delivered: acknowledged by the broker;
- failed: refused by the broker for itself (too large, not authorised, ...) ``retries`` + 1
  times; logged at ERROR with its key. A broker that is unreachable or times out never fails
  a record: it is retried, with backoff, for as long as it takes;
- retried: delivery attempts made again after a failed one (attempts, not records).

The balance holds at every moment: ``replayed + logged == delivered + failed + pending``, and
``send`` calls == ``logged + dropped``.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.wal import Entry, WriteAheadLog

log = logging.getLogger("sluice.serving.log")
RETRY_BACKOFF_S = 0.2
_MAX_BACKOFF_S = 10.0
# Records handed to librdkafka and not yet reported: beyond this they wait in the log on disk
# (the spill), not in memory.
MAX_IN_FLIGHT = 10_000
_READ_BATCH = 1000
_GATHER_S = 0.02  # the sender's pause after a hand-over that emptied the log (_run)
# How long librdkafka gathers the log's records into one produce request. The broker's cost is
# per request: at 5 ms, the local broker took a quarter of a core at 3,200 predictions/s (8
# clients, bench.serve), at 50 ms 7%, and the predictor answered 13-18% more requests on the
# same two cores. The log feeds monitoring, which reads it seconds later; ~70 ms more in the
# log (this plus _GATHER_S) is nothing there.
LINGER_MS = 50
SPILL_AFTER_S = 1.0
OUTCOMES = ("logged", "dropped", "replayed", "delivered", "failed", "retried")


class ProducerLike(Protocol):
    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Any) -> Any: ...
    def poll(self, timeout: float) -> int: ...
    def flush(self, timeout: float) -> int: ...


def _refused_codes() -> frozenset[int]:
    """Errors about the record itself: sending it again gives the same answer."""
    from confluent_kafka import KafkaError as E

    return frozenset(
        {
            E.MSG_SIZE_TOO_LARGE,
            E.INVALID_MSG,
            E.INVALID_MSG_SIZE,
            E.INVALID_RECORD,
            E.RECORD_LIST_TOO_LARGE,
            E.TOPIC_AUTHORIZATION_FAILED,
            E.CLUSTER_AUTHORIZATION_FAILED,
            E.TOPIC_EXCEPTION,
            E.POLICY_VIOLATION,
            E.UNSUPPORTED_FOR_MESSAGE_FORMAT,
            E._INVALID_ARG,
            E._BAD_MSG,
        }
    )


@dataclass
class LogCounts:
    logged: int = 0
    dropped: int = 0
    replayed: int = 0
    delivered: int = 0
    failed: int = 0
    retried: int = 0

    @property
    def pending(self) -> int:
        """Records in the log without an outcome yet (delivered or failed)."""
        return self.replayed + self.logged - self.delivered - self.failed


class _Record:
    __slots__ = ("attempts", "entry", "generation")

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.attempts = 0
        self.generation = 0


class KafkaLog:
    """Non-blocking, counted delivery of records to Kafka through a write-ahead log."""

    def __init__(
        self,
        producer: ProducerLike,
        wal: WriteAheadLog,
        *,
        retries: int = 5,
        retry_backoff_s: float = RETRY_BACKOFF_S,
        max_in_flight: int = MAX_IN_FLIGHT,
        prepare: Callable[[], object] | None = None,
        make_producer: Callable[[], ProducerLike] | None = None,
    ) -> None:
        self._producer = producer
        self.wal = wal
        self._retries = retries
        self._retry_backoff_s = retry_backoff_s
        self._max_in_flight = max_in_flight
        self._prepare = prepare  # e.g. create the topics; retried until it succeeds
        self._make_producer = make_producer  # replaces a producer hit by a fatal error
        self._refused = _refused_codes()
        # Worker-thread state: read position, records read and not finished (by offset, in
        # offset order), offsets due for another attempt, and the backoff after failures.
        self._position = wal.committed
        self._unfinished: dict[int, _Record] = {}
        self._retry: list[int] = []
        self._resume_at = 0.0
        self._failure_rounds = 0
        self._generation = 0
        self._ready = prepare is None
        self._last_progress = time.monotonic()
        self._stop = threading.Event()
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # counts: written by send() and by the worker
        self._counts: dict[str, Counter[str]] = {}
        for topic, n in wal.recovered.items():
            self._count("replayed", topic, n)

    # -- counting -----------------------------------------------------------------------------

    def _count(self, outcome: str, topic: str, n: int = 1) -> None:
        with self._lock:
            self._counts.setdefault(topic, Counter())[outcome] += n

    def by_topic(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {t: {o: c[o] for o in OUTCOMES} for t, c in self._counts.items()}

    @property
    def counts(self) -> LogCounts:
        """Totals over every topic."""
        with self._lock:
            totals: Counter[str] = sum(self._counts.values(), Counter())
        return LogCounts(**{o: totals[o] for o in OUTCOMES})

    def summary(self) -> dict[str, Any]:
        counts = self.counts
        return vars(counts) | {
            "pending": counts.pending,
            "in_flight": len(self._unfinished),
            "wal_bytes": self.wal.disk_bytes,
            "spilling": self.spilling,
        }

    @property
    def spilling(self) -> bool:
        """Whether records wait on disk for the broker: the topics could not be created yet,
        or records are pending and none was acknowledged (nor the log idle) for SPILL_AFTER_S."""
        if not self._ready:
            return True
        waiting = self._unfinished or self._position < self.wal.end
        return bool(waiting) and time.monotonic() - self._last_progress > SPILL_AFTER_S

    # -- the request side ---------------------------------------------------------------------

    def send(self, topic: str, key: bytes, value: bytes) -> bool:
        """Append a record to the log; False (and counted as dropped) when it cannot."""
        if self._stop.is_set():
            log.error("record logged after close", extra={"topic": topic, "key": key.decode()})
            self._count("dropped", topic)
            return False
        if self.wal.append(topic, key, value):
            self._count("logged", topic)
            return True
        self._count("dropped", topic)
        dropped = self.counts.dropped
        if dropped & (dropped - 1) == 0 or dropped % 10_000 == 0:  # 1, 2, 4, ...: no flood
            log.warning(
                "prediction log full, record dropped",
                extra={"topic": topic, "dropped": dropped, "wal_bytes": self.wal.disk_bytes},
            )
        return False

    # -- the sender thread --------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sluice-kafka-log", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._done():
            if not self._ready:
                self._ready = self._try_prepare()
                continue
            handed = 0
            if time.monotonic() >= self._resume_at:
                handed = self._hand_over_retries() + self._hand_over_new()
            # Serves delivery reports. After a hand-over that emptied the log, wait a little for
            # records to gather: the thread then wakes once per few milliseconds of traffic,
            # not once per record, and holds the GIL less often that the event loop needs
            # (librdkafka lingers linger.ms before sending anyway). A full read goes on at once.
            self._producer.poll(0 if handed >= _READ_BATCH else _GATHER_S if handed else 0.01)
            self.wal.commit(self._commit_point())
            if not self._unfinished and self._position >= self.wal.end:
                self._last_progress = time.monotonic()  # idle counts as keeping up
        if self._ready:  # reports of what is still in flight, so the commit is as far as it can be
            self._producer.poll(0.1)
            self.wal.commit(self._commit_point())

    def _done(self) -> bool:
        if not self._stop.is_set():
            return False
        idle = not self._unfinished and self._position >= self.wal.end
        return idle or time.monotonic() >= self._deadline

    def _try_prepare(self) -> bool:
        assert self._prepare is not None
        try:
            self._prepare()
        except Exception as exc:  # the broker is down: records wait in the log
            self._failure_rounds += 1
            if self._failure_rounds in (1, 10) or self._failure_rounds % 100 == 0:
                log.warning(
                    "prediction log: broker not ready, records kept on disk",
                    extra={"error": str(exc), "attempts": self._failure_rounds},
                )
            self._stop.wait(self._backoff())
            return False
        self._failure_rounds = 0
        log.info("prediction log: broker ready")
        return True

    def _backoff(self) -> float:
        growth: float = 2.0 ** max(0, self._failure_rounds - 1)
        return min(_MAX_BACKOFF_S, self._retry_backoff_s * growth)

    def _hand_over_retries(self) -> int:
        handed = 0
        while self._retry:  # oldest first
            record = self._unfinished.get(heapq.heappop(self._retry))
            if record is not None:
                self._hand_over(record)
                handed += 1
        return handed

    def _hand_over_new(self) -> int:
        room = min(_READ_BATCH, self._max_in_flight - len(self._unfinished))
        if room <= 0:
            return 0
        entries = self.wal.read(self._position, room)
        for entry in entries:
            record = _Record(entry)
            self._unfinished[entry.offset] = record
            self._position = entry.end
            self._hand_over(record)
        return len(entries)

    def _hand_over(self, record: _Record) -> None:
        record.attempts += 1
        record.generation = self._generation
        entry = record.entry
        while True:
            try:
                self._producer.produce(
                    entry.topic, value=entry.value, key=entry.key, on_delivery=self._report(record)
                )
                return
            except BufferError:  # librdkafka's own queue is full: serve reports, then retry
                self._producer.poll(0.05)

    def _commit_point(self) -> int:
        """Everything before the oldest unfinished record is acknowledged (or failed)."""
        return next(iter(self._unfinished), self._position)

    def _report(self, record: _Record) -> Callable[[Any, Any], None]:
        def report(err: Any, _msg: Any) -> None:
            if record.generation != self._generation:
                return  # from a producer since replaced; the record was sent again
            entry = record.entry
            if err is None:
                del self._unfinished[entry.offset]
                self._count("delivered", entry.topic)
                self._failure_rounds = 0
                self._last_progress = time.monotonic()
                return
            code = err.code() if hasattr(err, "code") else None
            if code in self._refused and record.attempts > self._retries:
                del self._unfinished[entry.offset]
                self._count("failed", entry.topic)
                log.error(
                    "record not delivered",
                    extra={"topic": entry.topic, "key": entry.key.decode(), "error": str(err)},
                )
                return
            self._count("retried", entry.topic)
            heapq.heappush(self._retry, entry.offset)
            now = time.monotonic()
            if now >= self._resume_at:  # the first failure of a round backs off further
                self._failure_rounds += 1
                self._resume_at = now + self._backoff()
            if getattr(err, "fatal", lambda: False)() and self._make_producer is not None:
                self._replace_producer(str(err))

        return report

    def _replace_producer(self, why: str) -> None:
        """An idempotent producer's fatal error ends that producer: send all again with a new."""
        assert self._make_producer is not None
        log.error("prediction log: producer failed fatally, replacing it", extra={"error": why})
        self._generation += 1
        self._retry = list(self._unfinished)  # already ascending: a valid heap
        self._producer = self._make_producer()

    def close(self, timeout_s: float = 10.0) -> LogCounts:
        """Deliver what is logged (within timeout_s), then stop; what is left stays in the log
        for the next start."""
        self._deadline = time.monotonic() + timeout_s
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s + 5)
            if self._thread.is_alive():
                log.error("prediction log sender did not stop")
                return self.counts
        counts = self.counts
        if counts.pending:
            log.warning(
                "prediction log: records left for the next start",
                extra={"pending": counts.pending, "directory": str(self.wal.directory)},
            )
        # Drop the client so librdkafka's threads and connections go now, not at exit.
        self._producer = _ClosedProducer()
        self.wal.close()
        return counts


class _ClosedProducer:
    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Any) -> Any:
        raise RuntimeError("the log is closed")

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        return 0


class LogCollector(Collector):
    """The log's counts and gauges for /metrics, read from the log itself at scrape time."""

    def __init__(self, kafka_log: KafkaLog) -> None:
        self._log = kafka_log

    def collect(self) -> Iterator[Metric]:
        records = CounterMetricFamily(
            "sluice_log_records",
            "Prediction-log and feedback records by topic and outcome (logged, dropped, "
            "replayed, delivered, failed; retried counts attempts)",
            labels=["topic", "outcome"],
        )
        for topic, outcomes in sorted(self._log.by_topic().items()):
            for outcome, n in outcomes.items():
                records.add_metric([topic, outcome], n)
        yield records
        summary = self._log.summary()
        yield GaugeMetricFamily(
            "sluice_log_pending_records",
            "Records in the write-ahead log not yet acknowledged by the broker",
            value=summary["pending"],
        )
        yield GaugeMetricFamily(
            "sluice_log_wal_bytes",
            "Bytes of the write-ahead log on disk",
            value=summary["wal_bytes"],
        )
        yield GaugeMetricFamily(
            "sluice_log_spilling",
            "1 while the broker does not take records (they wait in the write-ahead log)",
            value=float(summary["spilling"]),
        )


def kafka_producer(settings: Any) -> ProducerLike:
    """An idempotent confluent-kafka producer for the log, with the project's defaults."""
    from confluent_kafka import Producer

    from core.kafka import PRODUCER_DEFAULTS

    config = settings.kafka_client_config(**(PRODUCER_DEFAULTS | {"linger.ms": LINGER_MS}))
    producer: Any = Producer(config)  # its stub types callbacks more narrowly than ProducerLike
    return producer  # type: ignore[no-any-return]


def open_prediction_log(settings: Any, producer: ProducerLike | None = None) -> KafkaLog:
    """The log of settings: its write-ahead directory opened (and locked), and a producer for
    settings.kafka_bootstrap unless one is given. Nothing here waits for the broker: topics
    are created by the sender thread, retried until the broker answers."""
    directory = settings.prediction_log_dir or settings.state_dir / "prediction-log"
    wal = WriteAheadLog(
        directory,
        max_bytes=settings.prediction_log_max_bytes,
        fsync_interval_s=settings.prediction_log_fsync_ms / 1000,
    ).open()
    if producer is not None:
        return KafkaLog(producer, wal, retries=settings.prediction_log_retries)

    def create_topics() -> None:
        from core.kafka import ensure_topics

        ensure_topics(settings, [settings.prediction_topic, settings.feedback_topic], timeout_s=5)

    return KafkaLog(
        kafka_producer(settings),
        wal,
        retries=settings.prediction_log_retries,
        prepare=create_topics,
        make_producer=lambda: kafka_producer(settings),
    )
