"""Benchmark: Spark backfill throughput and how its cost grows, against a same-run baseline.

For each history size N: simulate N events of the default city and write them as parquet
history (not timed), then time ``batch.backfill.backfill`` of every example view (stream and
batch) over the whole date range, and, on the same data and chunks, the naive algorithm: explode
every event into every window end it belongs to and group by (key, end) with Spark's own
aggregates (batch.compile.direct_feature: each function's one-shot Spark aggregate). Both
write the offline store the same way; their row counts must agree.

Prints events/s per N, the ratio naive time / tile time, and how time per event grows between
sizes (1.0 = linear). Run: ``python -m bench.backfill --events 1000000 4000000``.

``--cluster``: instead of the naive baseline, the same backfill in local mode (``local[*]``,
history and offline store on local disk) against cluster mode in one run: a `up --cluster`
stack of its own, the backfill on its ``spark://`` master with the history and the offline
store on local disk ("cluster, files") and in the object store at ``s3://`` URIs, reached
through the bucket mount ("cluster, s3"). Row counts must agree across the three.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from batch.backfill import DEFAULT_CHUNK_DAYS, backfill, read_events, view_chunks
from batch.compile import BUCKET, END, EVENT_TIMESTAMP, KEY, direct_feature, prepare_events
from batch.offline_store import write_offline
from batch.session import spark_session
from core.settings import Settings, load_settings
from events.history import write_history
from examples.delivery.features import VIEWS
from examples.delivery.simulate import DeliverySimulator
from examples.delivery.sources import SOURCES
from features.definitions import FeatureView

DAY_MS = 86_400_000
START = datetime(2026, 10, 1, tzinfo=UTC)  # history in the past: every window is closed
LATER = datetime(2030, 1, 1, tzinfo=UTC)


def naive_compile(view: FeatureView, events: Any, end_range: tuple[int, int]) -> Any:
    """Every event exploded into each end of its largest window (plus the closing end), then
    one group-by with Spark's built-in aggregates. Same rows as compile_view."""
    from pyspark.sql import functions as sf

    slide = view.slide_ms
    n_max = view.max_window.size_ms // slide
    rows = prepare_events(view, events)
    rows = rows.withColumn(
        END, sf.explode(sf.sequence(sf.col(BUCKET) + 1, sf.col(BUCKET) + n_max + 1))
    )
    lo, hi = -(-end_range[0] // slide), -(-end_range[1] // slide)
    rows = rows.where((sf.col(END) >= lo) & (sf.col(END) < hi))
    features = [
        direct_feature(
            view, spec, sf.col(BUCKET) >= sf.col(END) - spec.window.size_ms // slide
        ).alias(spec.name)
        for spec in view.features()
    ]
    out = rows.groupBy(KEY, END).agg(*features)
    return out.select(
        sf.col(KEY).alias(view.entity.join_key),
        sf.timestamp_millis(sf.col(END) * slide).alias(EVENT_TIMESTAMP),
        *(spec.name for spec in view.features()),
    )


def naive_backfill(
    spark: Any, settings: Settings, start: date, end: date
) -> tuple[dict[str, int], dict[str, float]]:
    """The baseline over the same chunks as backfill(): rows written and seconds per view."""
    lo = int(datetime.combine(start, datetime.min.time(), UTC).timestamp() * 1000)
    hi = int(datetime.combine(end, datetime.min.time(), UTC).timestamp() * 1000)
    written, seconds = {}, {}
    for view in VIEWS:
        began = time.perf_counter()
        written[view.name] = 0
        for chunk_lo, chunk_hi in view_chunks(view, lo, hi, DEFAULT_CHUNK_DAYS):
            events, _ = read_events(
                spark,
                settings.history_dir,
                view.source,
                chunk_lo - view.max_window.size_ms - view.slide_ms,
                chunk_hi,
            )
            rows = naive_compile(view, events, (chunk_lo, chunk_hi))
            days = [
                datetime.fromtimestamp(ms / 1000, UTC).date()
                for ms in range(chunk_lo - chunk_lo % DAY_MS, chunk_hi, DAY_MS)
            ]
            written[view.name] += write_offline(settings, view, rows, days)
        seconds[view.name] = time.perf_counter() - began
    return written, seconds


def write_events(root: Path, n: int, seed: int) -> tuple[date, date, float]:
    started = time.perf_counter()
    simulator = DeliverySimulator(seed=seed, start_ms=int(START.timestamp() * 1000))
    last_ms = 0

    def stream() -> Any:
        nonlocal last_ms
        for event in itertools.islice(simulator.events(), n):
            last_ms = event.event_time_ms
            yield event

    write_history(stream(), root, SOURCES)
    last = datetime.fromtimestamp(last_ms / 1000, UTC).date()
    return START.date(), last + timedelta(days=1), time.perf_counter() - started


def tiles_backfill(
    spark: Any, settings: Settings, start: date, end: date
) -> tuple[dict[str, int], dict[str, float]]:
    report = backfill(
        settings, VIEWS, start, end, materialize=False, show_progress=False, now=LATER, spark=spark
    )
    return report.rows_written, {v.view: sum(s.seconds for s in v.steps) for v in report.views}


def run(sizes: list[int], seed: int, baseline: bool, repeat: int) -> None:
    spark = spark_session(load_settings())
    results: list[tuple[int, float, float | None]] = []
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        for n in sizes:
            root = Path(tmp) / f"history-{n}"
            start, end, generation_s = write_events(root, n, seed)
            print(
                f"\n{n:,} events over {(end - start).days} days of history"
                f" (simulated and written in {generation_s:.1f} s)"
            )
            settings = load_settings(history_dir=root, offline_store_dir=Path(tmp) / f"out-{n}")
            if not results:  # the session's first jobs pay JIT and class loading: not timed
                tiles_backfill(spark, settings, start, start + timedelta(days=1))
            # Alternate the two and keep each one's best run: other load on the machine then
            # hits both alike instead of whichever ran during it.
            runs: dict[str, list[tuple[float, dict[str, int], dict[str, float]]]] = {}
            algorithms = {
                "tiles": tiles_backfill,
                **({"naive": naive_backfill} if baseline else {}),
            }
            for _ in range(repeat):
                for name, algorithm in algorithms.items():
                    began = time.perf_counter()
                    rows, per_view = algorithm(spark, settings, start, end)
                    runs.setdefault(name, []).append((time.perf_counter() - began, rows, per_view))
            best = {name: min(times, key=lambda r: r[0]) for name, times in runs.items()}
            for name, (seconds, rows, per_view) in best.items():
                views = ", ".join(f"{view} {s:.1f} s" for view, s in per_view.items())
                every = " / ".join(f"{r[0]:.1f}" for r in runs[name])
                print(f"  {name:>5}: {seconds:6.1f} s  {n / seconds:>9,.0f} events/s  [{views}]")
                print(f"         runs: {every} s; rows written: {rows}")
            if baseline and best["naive"][1] != best["tiles"][1]:
                raise SystemExit(f"row counts differ: {best['naive'][1]} vs {best['tiles'][1]}")
            naive_s = best["naive"][0] if baseline else None
            if naive_s is not None:
                print(f"  naive time / tiles time: {naive_s / best['tiles'][0]:.2f}x")
            results.append((n, best["tiles"][0], naive_s))
    print("\nsummary (best of each)")
    print(f"{'events':>10} {'tiles s':>8} {'events/s':>10} {'naive s':>8} {'naive/tiles':>11}")
    for n, tiles_s, naive_s in results:
        naive = f"{naive_s:8.1f} {naive_s / tiles_s:10.2f}x" if naive_s else f"{'-':>8} {'-':>11}"
        print(f"{n:>10,} {tiles_s:8.1f} {n / tiles_s:10,.0f} {naive}")
    for (n1, t1, b1), (n2, t2, b2) in itertools.pairwise(results):
        growth = (t2 / n2) / (t1 / n1)
        line = f"time per event, {n2:,} vs {n1:,} events: tiles {growth:.2f}x"
        if b1 and b2:
            line += f", naive {(b2 / n2) / (b1 / n1):.2f}x"
        print(line + " (1.0 = linear; below 1: fixed costs amortized)")


def timed_best(
    spark: Any, settings: Settings, start: date, end: date, repeat: int
) -> tuple[float, dict[str, int]]:
    """The best of ``repeat`` timed tile backfills over the range: (seconds, rows written)."""
    runs = []
    for _ in range(repeat):
        began = time.perf_counter()
        rows, _ = tiles_backfill(spark, settings, start, end)
        runs.append((time.perf_counter() - began, rows))
    return min(runs, key=lambda r: r[0])


def run_cluster(sizes: list[int], seed: int, repeat: int) -> None:
    """Local mode against cluster mode (files, then s3://) on the same histories."""
    from batch.session import stop_session
    from bench.cluster import own_cluster

    modes = ("local", "cluster, files", "cluster, s3")
    seconds: dict[tuple[str, int], float] = {}
    written: dict[tuple[str, int], dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        histories = {n: write_events(Path(tmp) / f"history-{n}", n, seed) for n in sizes}

        def measure(mode: str, spark: Any, settings_for: Any) -> None:
            for i, n in enumerate(sizes):
                start, end, _ = histories[n]
                settings = settings_for(n)
                if i == 0:  # the session's first jobs pay JIT and class loading: not timed
                    tiles_backfill(spark, settings, start, start + timedelta(days=1))
                seconds[mode, n], written[mode, n] = timed_best(spark, settings, start, end, repeat)
                print(f"  {mode:>14}: {n:>10,} events {seconds[mode, n]:6.1f} s", flush=True)

        local = load_settings(spark_master="local[*]")
        measure(
            "local",
            spark_session(local),
            lambda n: local.model_copy(
                update={
                    "history_dir": Path(tmp) / f"history-{n}",
                    "offline_store_dir": Path(tmp) / f"local-{n}",
                }
            ),
        )
        stop_session()
        with own_cluster(load_settings(), "bench-backfill") as cluster:
            on_s3 = {
                n: Settings.model_validate(
                    cluster.model_dump()
                    | {
                        "history_dir": f"s3://sluice/bench-backfill/history-{n}",
                        "offline_store_dir": f"s3://sluice/bench-backfill/offline-{n}",
                    }
                )
                for n in sizes
            }
            for n in sizes:  # into the bucket, through the mount (not timed)
                shutil.copytree(Path(tmp) / f"history-{n}", on_s3[n].history_dir)
            spark = spark_session(cluster)
            measure(
                "cluster, files",
                spark,
                lambda n: cluster.model_copy(
                    update={
                        "history_dir": Path(tmp) / f"history-{n}",
                        "offline_store_dir": Path(tmp) / f"cluster-{n}",
                    }
                ),
            )
            measure("cluster, s3", spark, lambda n: on_s3[n])
            stop_session()
    for n in sizes:
        if any(written[mode, n] != written["local", n] for mode in modes):
            raise SystemExit(f"row counts differ at {n:,} events: {written}")
    print(
        f"\nbackfill, local against cluster mode, best of {repeat} (others may share the machine)"
    )
    print(f"{'events':>10} {'local s':>8} {'files s':>8} {'x local':>8} {'s3 s':>8} {'x local':>8}")
    for n in sizes:
        base, files, s3 = (seconds[mode, n] for mode in modes)
        print(f"{n:>10,} {base:8.1f} {files:8.1f} {files / base:8.2f} {s3:8.1f} {s3 / base:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000], help="history sizes")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive baseline")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each; the best counts")
    parser.add_argument(
        "--cluster", action="store_true", help="local mode against a cluster of its own"
    )
    args = parser.parse_args()
    if args.cluster:
        run_cluster(sorted(args.events), args.seed, max(1, args.repeat))
        return
    run(sorted(args.events), args.seed, not args.no_baseline, max(1, args.repeat))


if __name__ == "__main__":
    main()
