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
                 each event: the cost of getting events into Python at all (PyFlink's
                 default process mode, the issue's reference; baseline-thread: the same job
                 in thread mode, off by default);
       ceiling   a Flink SQL job that reads and decodes the same columns into a blackhole
                 sink, no Python: the Java ceiling.
       tiles-sql the tile engine's query alone into a blackhole (no Python): what its SQL
                 side costs, between the ceiling and the full job;
       tiles-p2, tiles-process  the tile engine at parallelism 2, and with its Python in
                 process mode (Beam workers; the default is thread mode), each against tiles;
       tiles-workers  the tile engine with its Python workers in processes of their own
                 instead of inside this process (PyFlink's loopback mode for local jobs; off
                 by default);
       tiles-hot the tile engine over --events of which half are on one key (the same
                 simulator, every other event's entity replaced; preloaded into a second
                 broker after the rest);
       tiles-30d the tile engine with the views' windows all 30 days on 1-minute slides
                 (43,200 tiles per key; bench/stream_jobs.month_view), against tiles-few:
                 the views as they are, on the same events. Both over --events whose entities
                 are folded onto FEW_KEYS per view (a broker of their own): at the end of the
                 input a 30-day window emits a row a minute for 30 days per key (43,200
                 closing rows), which for the simulator's 212 keys would be 9 million rows;
                 the marginal rate cancels them, the full run's seconds do not;
       tiles-cluster  the tiles job submitted to a `up --cluster` session cluster of its
                 own (bench/stream_jobs.on_cluster; off by default): cluster against local.
       tiles-live  the tile engine over the same events at a live density (a broker of its
                 own): every event's time fields moved towards the first event's, so that
                 the events span --events / --density seconds of event time. The replay
                 above is a backlog: the simulator's 200k events span 25.5 hours (about 2
                 events per second of event time), so nearly every event opens a tile of its
                 own and closes windows (about 1.1 rows written per event). A job that keeps
                 up with a live stream of D events/s sees D events per second of event time:
                 its tiles hold many events each, and rows per event fall with D. The tile
                 ratio the issue speaks of is this, and both ends are reported.
     For every local job: the peak RSS and the marginal CPU per event of the Flink JVM and of
     this process (a local job's Python workers run inside it: PyFlink's loopback mode).
  2. freshness: events are produced live at --rate/s with event time = now into a view of
     1-minute windows every 5 s (2 s allowed lateness). For every (entity, window end): the
     time from the window's close (the moment every partition holds a record at or past
     end + lateness, so the watermark can pass the end) to the row being readable through
     the online store's read (polled every 10 ms). p50 / p99 / max. Also from the window's
     servable time (end + view.lateness, features/contract.py), which the row must beat:
     negative is early. Windows that close within 10 s of the first row readable are
     start-up, left out; the time from the first event to the first row readable is
     printed apart.
Every job of this process runs in one JVM (PyFlink's gateway), and the first job to run in it
pays JIT compilation and class loading of Flink's runtime that the discarded small run does not
wholly cancel: so one full run of the first job goes first, unmeasured (--warmup 0: none).
Measured 2026-12-06, 200k events, two tile jobs per process (its Python workers in loopback
and in processes of their own), each order once, no warm-up: 15,896 and 12,374 events/s as the
first job, 17,324 and 19,084 as the second: the order, not the setting, made the difference.
With the warm-up, tiles and baseline in both orders: tiles 15,450 first and 16,163 second.
Defaults: 1M events, marginal over the second half. At 200k events with a 10% small run the
marginal time was about 5 s of a 20 s run and the rest varied by seconds: tiles-java measured
73,632, 42,173 and 26,290 events/s within an hour on an idle machine (2026-12-07), and once
288,709 (a slow small run); at 1M over the second 500k, five runs the same day 58,226 to
80,703. The peak RSS at 1M events comes with it.
Run: `python -m bench.stream` (every local figure in one run); `--events 200000 --small 0.1`
for a quicker, noisier one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.stream_events import FEW_KEYS, PARTITIONS, START_MS, preload
from bench.stream_freshness import WARM_UP_MS, Freshness, freshness, quantiles_ms
from bench.stream_jobs import PeakRss, baseline, ceiling, month_view, on_cluster, tiles_sql
from core.kafka import ensure_topics
from core.settings import Settings, load_settings
from examples.delivery.features import restaurant_orders, zone_couriers
from infra.stack import free_port, stack_down, stack_up
from streaming.job import JobOptions
from streaming.runner import run as run_stream
from streaming.sinks import STATS_TOPIC


def engine_run(
    settings: Settings,
    stop: dict[str, dict[int, int]],
    options: JobOptions,
    month: bool = False,
) -> tuple[float, int]:
    """(wall seconds, rows) of the real job over the preloaded events up to ``stop``;
    ``month``: the views with 30-day windows on 1-minute slides."""
    views = [restaurant_orders, zone_couriers]
    started = time.monotonic()
    report = run_stream(
        settings,
        [month_view(v) for v in views] if month else views,
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
    "baseline-thread": "the same parse-only job in PyFlink's thread mode (PEMJA)",
    "ceiling": "Flink SQL that only reads and decodes (the Java ceiling)",
    "tiles-sql": "the tile engine's SQL alone, into a blackhole (no Python)",
    "tiles-java": "the tile engine, windows assembled in the JVM (Python per row written online)",
    "tiles-p2": "the tile engine at parallelism 2",
    "tiles-process": "the tile engine, Python in process mode (Beam workers, not PEMJA)",
    "tiles-workers": "the tile engine, Python workers in processes of their own (not loopback)",
    "tiles-hot": "the tile engine, half the events on one key (a second broker)",
    "tiles-30d": "the tile engine, 30-day windows on 1-minute slides (few keys, a broker)",
    "tiles-few": "the tile engine, the views as they are, on tiles-30d's events",
    "tiles-cluster": "the tile engine on a session cluster of its own",
    "tiles-live": "the tile engine, the events at --density events/s of event time (a broker)",
}
DEFAULT_ENGINES = (
    "tiles-java,tiles,baseline,ceiling,tiles-sql,tiles-p2,tiles-process,tiles-hot,tiles-few,"
    "tiles-30d,tiles-live"
)
# Jobs over preloads of their own (a broker each): hot key; few keys (tiles-30d's).
OWN_BROKER = {"tiles-hot": "hot", "tiles-few": "few", "tiles-30d": "few", "tiles-live": "live"}
# The target rate, as events per second of event time: what a job that keeps up with
# a live stream at that rate sees.
LIVE_DENSITY = 40_000.0
# pyflink/datastream/stream_execution_environment._open reads it: unset, a local job runs its
# Python workers in this process ("loopback"); "process": in processes of their own.
LOOPBACK_VARIABLE = "_python_worker_execution_mode"


@dataclasses.dataclass
class Measured:
    rate: float = 0.0  # marginal events/s, the median of the rounds'
    seconds: float = 0.0  # the full run, the median of the rounds'
    rows: int | None = None
    peak_rss_mb: float | None = None
    # (events, CPU s of the cluster, of which Python's, of which the JIT's)
    runs: list[tuple[int, float, float, float]] = dataclasses.field(default_factory=list)
    rounds: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (rate, s)

    def add_round(self, rate: float, seconds: float) -> None:
        self.rounds.append((rate, seconds))
        self.rate = statistics.median(r for r, _ in self.rounds)
        self.seconds = statistics.median(s for _, s in self.rounds)

    def _marginal_us(self, part: int) -> float | None:
        """The median over the rounds of (full run - small run) / their events' difference:
        each round's runs are small, small, full (marginal)."""
        found = [
            (full[part] - small[part]) / (full[0] - small[0]) * 1e6
            for small, full in itertools.pairwise(self.runs)
            if full[0] > small[0]
        ]
        return statistics.median(found) if found else None

    @property
    def cpu_us(self) -> float | None:
        """Marginal CPU microseconds per event of the local Flink cluster (JVM and Python
        workers), between the small and the full run; robust to a shared machine's load."""
        return self._marginal_us(1)

    @property
    def python_us(self) -> float | None:
        """The Python workers' part of cpu_us."""
        return self._marginal_us(2)

    @property
    def jit_us(self) -> float | None:
        """The JIT compiler threads' part of cpu_us (PeakRss.jit_cpu_s): cpu_us - jit_us is
        the job's own work, which varies far less from run to run."""
        return self._marginal_us(3)


def _job(engine: str, settings: Settings, options: JobOptions, found: Measured) -> Any:
    """offsets -> wall seconds of one run of the engine's job (the tile variants, tiles-p2 and
    the others, run on options.engine: --tile-engine)."""
    tile_jobs = (
        "tiles-p2",
        "tiles-process",
        "tiles-hot",
        "tiles-workers",
        "tiles-few",
        "tiles-30d",
        "tiles-live",
    )
    if engine in ("tiles", "events", "tiles-java", *tile_jobs):
        own = engine in ("tiles", "events", "tiles-java")
        job_options = dataclasses.replace(options, engine=engine if own else options.engine)
        month = engine == "tiles-30d"
        if engine == "tiles-p2":
            job_options = dataclasses.replace(job_options, parallelism=2)
        if engine in ("tiles-process", "tiles-workers"):  # loopback: a process-mode choice
            job_options = dataclasses.replace(job_options, python_mode="process")

        def run(offsets: dict[str, dict[int, int]]) -> float:
            if engine != "tiles-workers":
                seconds, found.rows = engine_run(settings, offsets, job_options, month)
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
    if engine in ("baseline", "baseline-thread"):
        mode = "thread" if engine == "baseline-thread" else "process"
        return lambda o: baseline(settings, o, options.parallelism, mode)
    if engine == "ceiling":
        return lambda o: ceiling(settings, o, options.parallelism)
    raise SystemExit(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")


def measure_engine(
    engine: str,
    settings: Settings,
    stop: dict[str, dict[int, int]],
    small: dict[str, dict[int, int]],
    options: JobOptions,
    found: Measured | None = None,
) -> Measured:
    """One round of an engine's marginal rate over the preloaded events (see marginal), with
    the peak RSS and the CPU time of the local Flink cluster in each run; added to ``found``'s
    earlier rounds."""
    found = found or Measured()
    if engine == "tiles-cluster":
        found.add_round(
            *on_cluster(
                settings,
                lambda s, o: marginal(lambda x: engine_run(s, x, o)[0], stop, small),
                options,
            )
        )
        return found
    run = _job(engine, settings, options, found)

    def job(offsets: dict[str, dict[int, int]]) -> float:
        with PeakRss() as rss:
            seconds = float(run(offsets))
        found.peak_rss_mb = max(found.peak_rss_mb or 0.0, rss.peak)
        events = sum(sum(o.values()) for o in offsets.values())
        found.runs.append((events, rss.cpu_s, rss.python_cpu_s, rss.jit_cpu_s))
        return seconds

    found.add_round(*marginal(job, stop, small))
    return found


def in_rounds(engines: list[str], rounds: int) -> list[str]:
    """The order of the measurements: every round runs each engine once, every other round in
    the reverse order (A B C, C B A, ...), so that a drift of the machine's speed and a job's
    place in the JVM's life reach each engine alike (on an idle machine, 2026-12-07, the same
    tiles-java job measured 72,711 and 46,659 events/s in two rounds 12 minutes apart)."""
    return [e for r in range(rounds) for e in (engines if r % 2 == 0 else engines[::-1])]


def warm_up(
    engines: list[str],
    settings: Settings,
    stop: dict[str, dict[int, int]],
    options: JobOptions,
    runs: int,
) -> None:
    """``runs`` full runs of the first job that runs in this process's JVM, not measured."""
    local = [e for e in engines if e != "tiles-cluster" and e not in OWN_BROKER]
    for _ in range(runs if local else 0):
        seconds = _job(local[0], settings, options, Measured())(stop)
        print(f"warm-up: {local[0]} in {seconds:.1f} s (not measured)", flush=True)


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
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--small", type=float, default=0.5, help="share of the short runs")
    parser.add_argument("--hot-key", action="store_true", help="half the events on one key")
    parser.add_argument("--engines", default=DEFAULT_ENGINES, help=",".join(ENGINES))
    parser.add_argument("--rate", type=float, default=500.0, help="live events/s")
    parser.add_argument("--live-seconds", type=float, default=90.0)
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured full runs first")
    parser.add_argument(
        "--rounds", type=int, default=2, help="measurements of the main broker's jobs (median)"
    )
    parser.add_argument(
        "--density", type=float, default=LIVE_DENSITY, help="tiles-live: events/s of event time"
    )
    engine_names = ("tiles", "tiles-java", "events")
    parser.add_argument("--live-engine", default="tiles-java", choices=engine_names)
    # The engine of the tile variants (tiles-p2, -process, -workers, -hot, -30d, -few, -cluster).
    parser.add_argument("--tile-engine", default="tiles-java", choices=engine_names[:2])
    parser.add_argument("--parallelism", type=int, default=1)
    # Default: settings.flink_python_mode (thread).
    parser.add_argument("--python-mode", default=None, choices=("process", "thread"))
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
        engine=args.tile_engine,
    )
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for engine in engines:
        if engine not in ENGINES:
            raise SystemExit(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    results: dict[str, Measured] = {}
    live = Freshness()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as state:
        with local_stack(Path(state) / "main") as settings:
            stop = preload(settings, args.events, args.hot_key)
            small = share(stop, args.small)
            warm_up(engines, settings, stop, options, args.warmup)
            main = [e for e in engines if e not in OWN_BROKER]
            for engine in in_rounds(main, args.rounds):
                found = measure_engine(engine, settings, stop, small, options, results.get(engine))
                results[engine] = found
                print(f"{engine}: {found.rounds[-1][0]:,.0f} events/s", flush=True)
            if args.live_seconds > 0:
                live = freshness(
                    settings,
                    args.rate,
                    args.live_seconds,
                    JobOptions(engine=args.live_engine),
                    partitions=PARTITIONS,
                    start_ms=START_MS,
                )
        for broker in ("hot", "few", "live"):
            own = [e for e in engines if OWN_BROKER.get(e) == broker]
            if not own:
                continue
            with local_stack(Path(state) / broker) as settings:
                keys = FEW_KEYS if broker == "few" else None
                density = args.density if broker == "live" else None
                stop = preload(
                    settings, args.events, hot=broker == "hot", keys=keys, density=density
                )
                small = share(stop, args.small)
                for engine in own:
                    results[engine] = measure_engine(engine, settings, stop, small, options)
                    print(f"{engine}: {results[engine].rate:,.0f} events/s", flush=True)
    report(args, results, live, time.monotonic() - started)


def report(
    args: argparse.Namespace,
    results: dict[str, Measured],
    live: Freshness,
    seconds: float,
) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\ntile variants on {args.tile_engine}; "
        f"throughput: {args.events:,} events{' (half on one hot key)' if args.hot_key else ''} "
        f"(marginal over the first {args.small:.0%}; the median of {args.rounds} rounds), "
        f"parallelism {args.parallelism}, bundles {args.bundle_ms} ms, watermarks every "
        f"{args.watermark_ms} ms, Python {args.python_mode or Settings().flink_python_mode} "
        f"mode, {os.cpu_count()} cores, "
        f"load average at the end {load}, bench {seconds:.0f} s"
    )
    base = results["baseline"].rate if "baseline" in results else 0.0
    top = results["ceiling"].rate if "ceiling" in results else 0.0
    print(
        f"{'job':13} {'events/s':>10} {'full run s':>10} {'x baseline':>10} {'x ceiling':>10}"
        f" {'peak RSS MB':>11} {'CPU us/event':>12} {'of it Python':>12} {'of it JIT':>9}"
    )
    for engine, m in results.items():
        ratios = [f"{m.rate / r:10.2f}" if r else f"{'-':>10}" for r in (base, top)]
        rss = f"{m.peak_rss_mb:11,.0f}" if m.peak_rss_mb else f"{'-':>11}"
        cpu = " ".join(
            f"{us:12.1f}" if us is not None else f"{'-':>12}" for us in (m.cpu_us, m.python_us)
        )
        cpu += f" {m.jit_us:9.1f}" if m.jit_us is not None else f" {'-':>9}"
        print(f"{engine:13} {m.rate:10,.0f} {m.seconds:10.1f} {' '.join(ratios)} {rss} {cpu}")
    on = args.tile_engine  # what the tile variants run
    pairs = (
        ("tiles-p2", on, "parallelism 2 / 1"),
        ("tiles-process", on, "process / thread mode"),
        ("baseline-thread", "baseline", "parse-only baseline, thread / process mode"),
        ("tiles-workers", on, "own worker processes / loopback"),
        ("tiles-hot", on, "hot key / uniform keys"),
        ("tiles-live", on, f"{args.density:,.0f} events per event-time second / the replay"),
        ("tiles-30d", "tiles-few", f"30-day / the views' windows, {FEW_KEYS} keys a view"),
        ("tiles", "tiles-sql", "tiles (with Python) / its SQL alone"),
        ("tiles-java", "tiles-sql", "tiles-java / its SQL alone"),
        ("tiles-java", "tiles", "windows assembled in the JVM / in Python"),
        ("tiles-cluster", on, "session cluster / local"),
    )
    for a, b, what in pairs:
        if a in results and b in results and results[b].rate:
            ra, rb = results[a], results[b]
            rate, full = ra.rate / rb.rate, ra.seconds / rb.seconds
            cpu = ""
            if ra.cpu_us and rb.cpu_us:
                cpu = f", CPU per event {ra.cpu_us / rb.cpu_us:.2f}x"
            if ra.python_us and rb.python_us:
                cpu += f" (Python's {ra.python_us / rb.python_us:.2f}x)"
            own = [m.cpu_us - m.jit_us for m in (ra, rb) if m.cpu_us and m.jit_us is not None]
            if len(own) == 2 and own[1] > 0:
                cpu += f", without the JIT's {own[0] / own[1]:.2f}x"
            print(f"{what}: events/s {rate:.2f}x, full run {full:.2f}x{cpu}")
    for engine, m in results.items():
        if len(m.rounds) > 1:
            each = ", ".join(f"{r:,.0f}" for r, _ in m.rounds)
            print(f"  {engine}: events/s in each round {each} (in_rounds' order)")
    for engine, m in results.items():
        if m.rows is not None:
            per_event = f", {m.rows / m.runs[-1][0]:.3f} per event" if m.runs else ""
            print(f"  {engine}: {m.rows:,} rows to Redis and features.* in the full run{per_event}")
    print(
        "  peak RSS and CPU: the Flink JVM and this process (where a local job's Python "
        "workers run), sampled every 0.5 s; CPU per event is marginal (full run - small "
        "run), and counts every core; of it Python: every process but the JVM; of it JIT: "
        "the JVM's compiler threads (each run is a new job, its generated classes compiled anew)"
    )
    start = "-" if live.start_s is None else f"{live.start_s:.1f} s"
    print(
        f"freshness ({args.live_engine} engine), {args.rate:.0f} events/s live, "
        f"{len(live.readable):,} rows of the windows closed {WARM_UP_MS / 1000:.0f} s after "
        f"the first row was readable ({start} after the first event; window close to):"
    )
    print(f"  readable in Redis      {quantiles_ms(live.readable)}")
    print(f"  emitted by the window  {quantiles_ms(live.emitted)}")
    print("from servable time (end + lateness; negative: early):")
    print(f"  readable in Redis      {quantiles_ms(live.servable)}")
    print("the broker's part (a plain consumer of the same topic, the same run):")
    print(f"  produced to consumed   {quantiles_ms(live.delivered)}")
    print(
        f"  close consumed to readable in Redis (the job's part) "
        f"{quantiles_ms(live.readable_after_delivery)}"
    )


if __name__ == "__main__":
    main()
