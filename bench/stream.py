"""Benchmark: the Flink stream job's sustained throughput and its freshness, on this machine.

Starts its own broker and Redis on free loopback ports, then measures:
  1. throughput: --events canonical events (orders and courier pings from the simulator) are
     loaded into events.* first; each job below reads them bounded, to the end, for the
     example stream views (restaurant_orders, zone_couriers). Every job runs twice, over the
     first --small share of every partition and over all of it; events/s is the marginal rate
     (extra events / extra wall seconds), so JVM start-up, job submission and the end-of-input
     flush of every window cancel out alike for every job:
       tiles     the tile engine (streaming/tiles.py: SQL per event, Python per tile);
       events    the per-event engine (--engines events,...; slow, off by default);
       baseline  a PyFlink job with the same Kafka source whose Python function only parses
                 each event: the cost of getting events into Python at all;
       ceiling   a Flink SQL job that reads and decodes the same columns into a blackhole
                 sink, no Python: the Java ceiling.
       tiles-sql the tile engine's query alone into a blackhole (no Python): what its SQL
                 side costs, between the ceiling and the full job;
       tiles-p2, tiles-thread  the tile engine at parallelism 2, and with its Python in
                 thread mode (PEMJA), each against tiles;
       tiles-workers  the tile engine with its Python workers in processes of their own
                 instead of inside this process (PyFlink's loopback mode for local jobs; off
                 by default);
       tiles-hot the tile engine over --events of which half are on one key (the same
                 simulator, every other event's entity replaced; preloaded into a second
                 broker after the rest);
       tiles-cluster  the tiles job submitted to a `up --cluster` session cluster of its
                 own (bench/stream_jobs.on_cluster; off by default): cluster against local.
     For every local job: the peak RSS and the marginal CPU per event of the Flink JVM and of
     this process (a local job's Python workers run inside it: PyFlink's loopback mode).
  2. freshness: events are produced live at --rate/s with event time = now into a view of
     1-minute windows every 5 s (2 s allowed lateness). For every (entity, window end): the
     time from the window's close (the moment every partition holds a record at or past
     end + lateness, so the watermark can pass the end) to the row being readable through
     the online store's read (polled every 10 ms). p50 / p99 / max. Also from the window's
     servable time (end + view.lateness, features/contract.py), which the row must beat:
     negative is early.
Run: `python -m bench.stream` (200k events and every local figure in one run: about 12 minutes
on 2 cores); `--engines tiles --events 1000000 --live-seconds 0` for the RSS at 1M events.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import itertools
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from bench.stream_jobs import PeakRss, baseline, ceiling, on_cluster, tiles_sql
from core.kafka import PRODUCER_DEFAULTS, ensure_topics
from core.records import FeatureRow
from core.settings import Settings, load_settings
from examples.delivery.features import restaurant_orders, zone_couriers
from examples.delivery.simulate import DeliverySimulator
from examples.delivery.sources import COURIER_PINGS, ORDERS
from feature_repo.online_store import open_online_store
from features.contract import servable_at_ms
from features.definitions import Aggregation, AggregationFunction, FeatureView, Window
from features.validation import EventValidator, ValidEvent
from infra.stack import free_port, stack_down, stack_up
from streaming.compile import features_topic
from streaming.job import JobOptions
from streaming.runner import run as run_stream
from streaming.sinks import STATS_TOPIC, now_ms

START_MS = 1_767_268_800_000  # 2026-01-01 12:00 UTC, the lunch rush
LIVE_LATENESS = timedelta(seconds=2)
PARTITIONS = 4


HOT_KEYS = {ORDERS.name: "restaurant_id", COURIER_PINGS.name: "zone_id"}


def preload(settings: Settings, n: int, hot: bool = False) -> dict[str, dict[int, int]]:
    """n canonical events into events.orders / events.courier_pings; stop offsets per topic.
    ``hot``: every other event of each source belongs to one entity ("hot")."""
    validators = {s.name: EventValidator(s) for s in (ORDERS, COURIER_PINGS)}
    producer = Producer(settings.kafka_client_config(**PRODUCER_DEFAULTS))
    ends: dict[str, dict[int, int]] = {s.topic: {} for s in (ORDERS, COURIER_PINGS)}

    def delivered(err: Any, msg: Any) -> None:
        assert err is None, err
        topic_ends = ends[msg.topic()]
        topic_ends[msg.partition()] = max(topic_ends.get(msg.partition(), 0), msg.offset() + 1)

    events = (e for e in DeliverySimulator(seed=5, start_ms=START_MS).events())
    picked = (e for e in events if e.source in validators)
    for i, event in enumerate(itertools.islice(picked, n)):
        payload = event.payload
        if hot and i % 2 == 0:
            payload = payload | {HOT_KEYS[event.source]: "hot"}
        valid = validators[event.source].validate_object(payload, START_MS + 365 * 86_400_000)
        assert isinstance(valid, ValidEvent)
        topic = f"events.{event.source}"
        while True:
            try:
                producer.produce(
                    topic,
                    valid.to_json(),
                    valid.key,
                    timestamp=valid.event_time_ms,
                    on_delivery=delivered,
                )
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0
    for topic_ends in ends.values():
        for p in range(PARTITIONS):
            topic_ends.setdefault(p, 0)
    return ends


def engine_run(
    settings: Settings, stop: dict[str, dict[int, int]], options: JobOptions
) -> tuple[float, int]:
    """(wall seconds, rows) of the real job over the preloaded events up to ``stop``."""
    started = time.monotonic()
    report = run_stream(
        settings,
        [restaurant_orders, zone_couriers],
        stop_at_offsets=stop,
        options=options,
        report_every_s=60,
        echo=lambda _: None,
    )
    seconds = time.monotonic() - started
    assert report.balanced(), report
    events = sum(v.events for v in report.views.values())
    assert events == sum(sum(o.values()) for o in stop.values()), "not every event was read"
    return seconds, sum(v.rows for v in report.views.values())


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


def freshness(
    settings: Settings, rate: float, seconds: float, options: JobOptions
) -> tuple[list[float], list[float], list[float]]:
    """Seconds from window close to (readable online, emitted by the window operator), and
    from servable time to readable online, one sample per (entity, window end)."""
    view = live_view()
    ensure_topics(settings, [view.source.topic], partitions=PARTITIONS)
    validator = EventValidator(view.source)
    sim = DeliverySimulator(seed=9, start_ms=START_MS)
    templates = [e.payload for e in itertools.islice(sim.events(), 20_000) if e.source == "orders"]
    keys = sorted({t["restaurant_id"] for t in templates})
    stop = threading.Event()
    stamps: list[list[int]] = [[] for _ in range(PARTITIONS)]  # event times per partition
    seen: dict[tuple[str, int], int] = {}  # (entity, end) -> wall ms first readable

    def produce() -> None:
        producer = Producer(settings.kafka_client_config(**(PRODUCER_DEFAULTS | {"linger.ms": 2})))
        for i, template in enumerate(itertools.cycle(templates)):
            if stop.is_set():
                break
            t = now_ms()
            valid = validator.validate_object(template | {"placed_at": t}, t + 1000)
            assert isinstance(valid, ValidEvent)
            partition = i % PARTITIONS  # known, so the close of a window is known
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

    began = 0.0
    threads = [threading.Thread(target=f, daemon=True) for f in (produce, poll_redis)]
    warm_until_ms = 0

    def should_stop() -> bool:
        # Called by run() once the job is submitted: traffic starts when the job is up, so
        # no backlog from the JVM's start-up skews the first windows.
        nonlocal began, warm_until_ms
        if not began:
            began = time.monotonic()
            warm_until_ms = now_ms() + 10_000
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
    # Windows that closed in the first 10 s of traffic are left out (warm-up).
    first_end = warm_until_ms - lateness

    def since_close(end: int, wall: int) -> float | None:
        if end < first_end:
            return None
        closes = []
        for times in stamps:
            i = bisect.bisect_left(times, end + lateness)
            if i == len(times):
                return None
            closes.append(times[i])
        return (wall - max(closes)) / 1000

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
    return (
        [x for x in readable if x is not None],
        [x for x in emitted if x is not None],
        servable,
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


def share(stop: dict[str, dict[int, int]], fraction: float) -> dict[str, dict[int, int]]:
    """The first ``fraction`` of every partition."""
    return {t: {p: int(o * fraction) for p, o in offs.items()} for t, offs in stop.items()}


def marginal(
    measure: Any, stop: dict[str, dict[int, int]], small: dict[str, dict[int, int]]
) -> tuple[float, float]:
    """(events/s between the small and the full run, seconds of the full run). The small run
    goes twice and the first is discarded: it pays the JVM gateway's start and class loading."""
    count = sum(sum(o.values()) for o in stop.values())
    small_count = sum(sum(o.values()) for o in small.values())
    measure(small)
    small_s = measure(small)
    full_s = measure(stop)
    if full_s <= small_s:  # too few events to tell the rate from the noise
        return float("nan"), full_s
    return (count - small_count) / (full_s - small_s), full_s


ENGINES = {
    "tiles": "the tile engine (SQL per event, Python per tile)",
    "events": "the per-event engine",
    "baseline": "PyFlink job that only parses each event",
    "ceiling": "Flink SQL that only reads and decodes (the Java ceiling)",
    "tiles-sql": "the tile engine's SQL alone, into a blackhole (no Python)",
    "tiles-p2": "the tile engine at parallelism 2",
    "tiles-thread": "the tile engine, Python in thread mode (PEMJA)",
    "tiles-workers": "the tile engine, Python workers in processes of their own (not loopback)",
    "tiles-hot": "the tile engine, half the events on one key (a second broker)",
    "tiles-cluster": "the tile engine on a session cluster of its own",
}
DEFAULT_ENGINES = "tiles,baseline,ceiling,tiles-sql,tiles-p2,tiles-thread,tiles-hot"
# pyflink/datastream/stream_execution_environment._open reads it: unset, a local job runs its
# Python workers in this process ("loopback"); "process": in processes of their own.
LOOPBACK_VARIABLE = "_python_worker_execution_mode"


@dataclasses.dataclass
class Measured:
    rate: float = 0.0  # marginal events/s
    seconds: float = 0.0  # the full run
    rows: int | None = None
    peak_rss_mb: float | None = None
    runs: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (events, CPU s)

    @property
    def cpu_us(self) -> float | None:
        """Marginal CPU microseconds per event of the local Flink cluster (JVM and Python
        workers), between the small and the full run; robust to a shared machine's load."""
        if len(self.runs) < 2 or self.runs[-1][0] == self.runs[-2][0]:
            return None
        (n0, c0), (n1, c1) = self.runs[-2:]
        return (c1 - c0) / (n1 - n0) * 1e6


def _job(engine: str, settings: Settings, options: JobOptions, found: Measured) -> Any:
    """offsets -> wall seconds of one run of the engine's job."""
    if engine in ("tiles", "events", "tiles-p2", "tiles-thread", "tiles-hot", "tiles-workers"):
        job_options = dataclasses.replace(options, engine=engine.split("-")[0])
        if engine == "tiles-p2":
            job_options = dataclasses.replace(job_options, parallelism=2)
        if engine == "tiles-thread":
            job_options = dataclasses.replace(job_options, python_mode="thread")

        def run(offsets: dict[str, dict[int, int]]) -> float:
            if engine != "tiles-workers":
                seconds, found.rows = engine_run(settings, offsets, job_options)
                return seconds
            # PyFlink runs a local job's Python workers inside the client process (loopback,
            # beside the runner's own threads) unless this variable says otherwise.
            os.environ[LOOPBACK_VARIABLE] = "process"
            try:
                seconds, found.rows = engine_run(settings, offsets, job_options)
            finally:
                del os.environ[LOOPBACK_VARIABLE]
            return seconds

        return run
    if engine == "tiles-sql":
        return lambda o: tiles_sql(settings, o, options)
    if engine == "baseline":
        return lambda o: baseline(settings, o, options.parallelism)
    if engine == "ceiling":
        return lambda o: ceiling(settings, o, options.parallelism)
    raise SystemExit(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")


def measure_engine(
    engine: str,
    settings: Settings,
    stop: dict[str, dict[int, int]],
    small: dict[str, dict[int, int]],
    options: JobOptions,
) -> Measured:
    """One engine's marginal rate over the preloaded events (see marginal), with the peak RSS
    and the CPU time of the local Flink cluster in each run."""
    found = Measured()
    if engine == "tiles-cluster":
        found.rate, found.seconds = on_cluster(
            settings,
            lambda s, o: marginal(lambda x: engine_run(s, x, o)[0], stop, small),
            dataclasses.replace(options, engine="tiles"),
        )
        return found
    run = _job(engine, settings, options, found)

    def job(offsets: dict[str, dict[int, int]]) -> float:
        with PeakRss() as rss:
            seconds = float(run(offsets))
        found.peak_rss_mb = max(found.peak_rss_mb or 0.0, rss.peak)
        found.runs.append((sum(sum(o.values()) for o in offsets.values()), rss.cpu_s))
        return seconds

    found.rate, found.seconds = marginal(job, stop, small)
    return found


@contextlib.contextmanager
def local_stack(state: Path) -> Iterator[Settings]:
    """A broker and Redis of their own on free loopback ports, state under ``state``."""
    settings = load_settings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        state_dir=state,
        topic_partitions=PARTITIONS,
    )
    stack_up(settings)
    try:
        ensure_topics(settings, [STATS_TOPIC], partitions=1)
        yield settings
    finally:
        stack_down(settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--small", type=float, default=0.1, help="share of the short runs")
    parser.add_argument("--hot-key", action="store_true", help="half the events on one key")
    parser.add_argument("--engines", default=DEFAULT_ENGINES, help=",".join(ENGINES))
    parser.add_argument("--rate", type=float, default=500.0, help="live events/s")
    parser.add_argument("--live-seconds", type=float, default=60.0)
    parser.add_argument("--live-engine", default="tiles", choices=("tiles", "events"))
    parser.add_argument("--parallelism", type=int, default=1)
    parser.add_argument("--python-mode", default="process", choices=("process", "thread"))
    # Throughput against freshness: longer bundles and watermark intervals mean fewer Python
    # round trips per event, and rows that wait longer (the freshness run keeps the defaults).
    parser.add_argument("--bundle-ms", type=int, default=JobOptions.bundle_time_ms)
    parser.add_argument("--watermark-ms", type=int, default=JobOptions.watermark_interval_ms)
    args = parser.parse_args()
    options = JobOptions(
        parallelism=args.parallelism,
        bundle_time_ms=args.bundle_ms,
        watermark_interval_ms=args.watermark_ms,
        python_mode=args.python_mode,
    )
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for engine in engines:
        if engine not in ENGINES:
            raise SystemExit(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    results: dict[str, Measured] = {}
    readable: list[float] = []
    emitted: list[float] = []
    servable: list[float] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as state:
        with local_stack(Path(state) / "main") as settings:
            stop = preload(settings, args.events, args.hot_key)
            small = share(stop, args.small)
            for engine in (e for e in engines if e != "tiles-hot"):
                results[engine] = measure_engine(engine, settings, stop, small, options)
                print(f"{engine}: {results[engine].rate:,.0f} events/s", flush=True)
            if args.live_seconds > 0:
                live = JobOptions(engine=args.live_engine)
                readable, emitted, servable = freshness(
                    settings, args.rate, args.live_seconds, live
                )
        if "tiles-hot" in engines:
            with local_stack(Path(state) / "hot") as settings:
                stop = preload(settings, args.events, hot=True)
                small = share(stop, args.small)
                results["tiles-hot"] = measure_engine("tiles-hot", settings, stop, small, options)
                print(f"tiles-hot: {results['tiles-hot'].rate:,.0f} events/s", flush=True)
    report(args, results, (readable, emitted, servable), time.monotonic() - started)


def report(
    args: argparse.Namespace,
    results: dict[str, Measured],
    live: tuple[list[float], list[float], list[float]],
    seconds: float,
) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\nthroughput: {args.events:,} events{' (half on one hot key)' if args.hot_key else ''} "
        f"(marginal over the first {args.small:.0%}), "
        f"parallelism {args.parallelism}, bundles {args.bundle_ms} ms, watermarks every "
        f"{args.watermark_ms} ms, Python {args.python_mode} mode, {os.cpu_count()} cores, "
        f"load average at the end {load}, bench {seconds:.0f} s"
    )
    base = results["baseline"].rate if "baseline" in results else 0.0
    top = results["ceiling"].rate if "ceiling" in results else 0.0
    print(
        f"{'job':13} {'events/s':>10} {'full run s':>10} {'x baseline':>10} {'x ceiling':>10}"
        f" {'peak RSS MB':>11} {'CPU us/event':>12}"
    )
    for engine, m in results.items():
        ratios = [f"{m.rate / r:10.2f}" if r else f"{'-':>10}" for r in (base, top)]
        rss = f"{m.peak_rss_mb:11,.0f}" if m.peak_rss_mb else f"{'-':>11}"
        cpu = f"{m.cpu_us:12.1f}" if m.cpu_us is not None else f"{'-':>12}"
        print(f"{engine:13} {m.rate:10,.0f} {m.seconds:10.1f} {' '.join(ratios)} {rss} {cpu}")
    pairs = (
        ("tiles-p2", "tiles", "parallelism 2 / 1"),
        ("tiles-thread", "tiles", "thread / process mode"),
        ("tiles-workers", "tiles", "own worker processes / loopback"),
        ("tiles-hot", "tiles", "hot key / uniform keys"),
        ("tiles", "tiles-sql", "tiles (with Python) / its SQL alone"),
        ("tiles-cluster", "tiles", "session cluster / local"),
    )
    for a, b, what in pairs:
        if a in results and b in results and results[b].rate:
            ra, rb = results[a], results[b]
            rate, full = ra.rate / rb.rate, ra.seconds / rb.seconds
            cpu = ""
            if ra.cpu_us and rb.cpu_us:
                cpu = f", CPU per event {ra.cpu_us / rb.cpu_us:.2f}x"
            print(f"{what}: events/s {rate:.2f}x, full run {full:.2f}x{cpu}")
    for engine, m in results.items():
        if m.rows is not None:
            print(f"  {engine}: {m.rows:,} rows to Redis and features.* in the full run")
    print(
        "  peak RSS and CPU: the Flink JVM and this process (where a local job's Python "
        "workers run), sampled every 0.5 s; CPU per event is marginal (full run - small "
        "run), and counts every core"
    )
    readable, emitted, servable = live
    print(
        f"freshness ({args.live_engine} engine), {args.rate:.0f} events/s live, "
        f"{len(readable):,} rows (window close to):"
    )
    print(f"  readable in Redis      {quantiles_ms(readable)}")
    print(f"  emitted by the window  {quantiles_ms(emitted)}")
    print("from servable time (end + lateness; negative: early):")
    print(f"  readable in Redis      {quantiles_ms(servable)}")


if __name__ == "__main__":
    main()
