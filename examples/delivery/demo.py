"""`sluice demo`: the pipeline end to end on the local stack, on the live path.

Producers publish to the raw topics; ingest validates them into the events topics while the
archiver writes those topics into the parquet history (exactly once, by offsets). Spark
backfills and trains on that archive, so the batch engine reads exactly the events the stream
reads; a bounded Flink run over the same topics must then emit the rows Spark computed. The
predictor serves, every prediction is logged, and the monitor reads the log at the end.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta

from rich.console import Console
from rich.table import Table

from core.kafka import read_topics
from core.records import DeadLetter, FeatureRow
from core.settings import Settings
from events.archive import ArchiveCounts, run_archive
from events.ingest import IngestCounts, run_ingest
from examples.delivery.demo_serve import train_serve_and_predict
from examples.delivery.produce import ProduceReport, produce_synthetic
from examples.delivery.sources import SOURCES
from infra.stack import stack_down, stack_status, stack_up


def run_demo(settings: Settings, console: Console, *, events: int, keep_up: bool) -> None:
    already_running = all(c.ready for c in stack_status(settings))
    console.rule("1. local stack")
    for component in stack_up(settings):
        console.print(f"{component.name}: {component.state} at {component.address}")
    if not already_running:
        _forget_earlier_runs(settings, console)
    try:
        report = _produce(settings, console, events)
        counts, archived = _ingest_and_archive(settings, console, report)
        _show_dead_letters(settings, console, limit=5)
        _check(console, report, counts, archived)
        _feast_apply(settings, console)
        started_ms, flink_events = _stream(settings, console, report)
        _archive_late_marks(settings, console)
        _backfill(settings, console, report)
        _compare(settings, console, started_ms, flink_events)
        train_serve_and_predict(settings, console)
        _monitor(settings, console)
    finally:
        if keep_up or already_running:
            console.print("stack left running (`sluice down` stops it)")
        else:
            console.rule("stack down")
            stack_down(settings)
            console.print("broker and Redis stopped")


def _forget_earlier_runs(settings: Settings, console: Console) -> None:
    """The local broker keeps its topics in memory: one the demo just started has new topics,
    whose offsets start again at 0. The history of an earlier run holds the offsets of the old
    topics (the archive resumes from them: a new topic as long as the old one would look archived
    already), and the offline store was backfilled from that history. Both are the demo's own
    output and can only mislead now, so they go."""
    for directory in (settings.history_dir, settings.offline_store_dir):
        if directory.is_dir() and any(directory.iterdir()):
            shutil.rmtree(directory)
            console.print(f"{directory}: from an earlier run on another broker, removed")


def _produce(settings: Settings, console: Console, events: int) -> ProduceReport:
    console.rule("2. produce synthetic delivery traffic (2% malformed on purpose)")
    report = produce_synthetic(settings, events, corrupt_fraction=0.02)
    console.print(
        f"{report.events} events to raw topics in {report.seconds:.2f} s "
        f"({report.rate:,.0f}/s); by source: {dict(report.by_source)}"
    )
    return report


def _ingest_and_archive(
    settings: Settings, console: Console, report: ProduceReport
) -> tuple[IngestCounts, ArchiveCounts]:
    console.rule("3. ingest (raw -> events + dead letters), archive beside it (events -> history)")
    archived: list[ArchiveCounts] = []
    ingested_at: list[float] = []

    def ingest_done_a_while_ago() -> bool:
        # The archiver reads ~100k records/s: 5 s after ingest's last acknowledged write it
        # has read everything; it then flushes what it holds and returns.
        return bool(ingested_at) and time.monotonic() - ingested_at[0] > 5.0

    archiver = threading.Thread(
        target=lambda: archived.append(
            run_archive(settings, SOURCES, flush_seconds=1.0, should_stop=ingest_done_a_while_ago)
        ),
        name="archive",
        daemon=True,
    )
    archiver.start()
    started = time.monotonic()
    counts = run_ingest(settings, SOURCES, idle_timeout_s=3.0, max_events=report.events)
    seconds = time.monotonic() - started
    ingested_at.append(time.monotonic())
    archiver.join(timeout=300)
    if not archived:
        raise SystemExit("the archiver did not finish")
    table = Table("outcome", "records")
    for name, value in (
        ("received", counts.received),
        ("valid", counts.valid),
        ("dead-lettered", counts.dead_lettered),
    ):
        table.add_row(name, str(value))
    for reason, n in sorted(counts.by_reason.items()):
        table.add_row(f"  {reason}", str(n))
    console.print(table)
    console.print(f"ingest took {seconds:.2f} s ({counts.received / max(seconds, 1e-9):,.0f}/s)")
    archive = archived[0]
    console.print(
        f"archive: {archive.archived} events to {settings.history_dir} "
        f"({dict(archive.by_source)}), {archive.skipped} dead letters and heartbeats skipped"
    )
    return counts, archive


def _show_dead_letters(settings: Settings, console: Console, limit: int) -> None:
    console.rule(f"4. a few dead letters ({settings.dead_letter_topic})")
    for msg in read_topics(settings, [settings.dead_letter_topic], limit=limit):
        reason = DeadLetter.from_headers(msg.headers()).error
        console.print(f"- {reason}\n  original: {(msg.value() or b'')[:90]!r}")


def _feast_apply(settings: Settings, console: Console) -> None:
    from feature_repo.registry_ops import apply
    from features.registry import load_registry

    console.rule("6. feast apply: definitions -> Feast registry")
    changes = apply(settings, load_registry(settings.definitions_module))
    console.print(f"{len(changes)} registry changes applied to {settings.feast_registry}")


def _archive_late_marks(settings: Settings, console: Console) -> None:
    """The archiver resumes from its offsets and records the events the stream found late."""
    console.rule("8. archive again: the stream's late dead letters -> marks in the history")
    counts = run_archive(settings, SOURCES, flush_seconds=1.0, idle_timeout_s=3.0)
    console.print(
        f"{counts.late_marks} late marks; {counts.archived} new events; the batch engine leaves "
        "out, per view, exactly the events the stream did not count"
    )


def _backfill(settings: Settings, console: Console, report: ProduceReport) -> None:
    """A Spark backfill of the archive, and online reads."""
    from batch.backfill import backfill
    from feature_repo.online_store import open_online_store
    from features.registry import load_registry

    registry = load_registry(settings.definitions_module)
    console.rule("9. Spark backfill of the archive -> offline store + online store")
    first = datetime.fromtimestamp(report.first_event_ms / 1000, UTC).date()
    last = datetime.fromtimestamp(report.last_event_ms / 1000, UTC).date()
    views = list(registry.views.values())
    # One day past the last event: daily windows ending at the next midnight hold it.
    result = backfill(settings, views, first, last + timedelta(days=2), show_progress=False)
    for view_report in result.views:
        console.print(
            f"{view_report.view}: {view_report.events_read} events -> "
            f"{view_report.rows_written} offline rows, "
            f"{view_report.materialized} entities online"
        )
    console.print(f"backfill took {result.seconds:.1f} s")

    console.rule("online values (Redis, Feast layout)")
    view = registry.views["restaurant_orders"]
    with open_online_store(settings) as store:
        keys = [f"r{n:05d}" for n in range(5)]
        for key, row in zip(keys, store.read(view, keys), strict=True):
            if row is None:
                console.print(f"{key}: no value yet")
                continue
            end = datetime.fromtimestamp(row.window_end_ms / 1000, UTC).isoformat()
            console.print(f"{key} @ window end {end}: {dict(row.values)}")


def _stream(settings: Settings, console: Console, report: ProduceReport) -> tuple[int, int]:
    """A bounded Flink run over the events topics; returns when it started and events read."""
    import streaming
    from features.registry import load_registry
    from streaming.job import JobOptions
    from streaming.runner import run as run_stream

    console.rule("7. Flink over the events topics -> Redis + features.<view> topics")
    registry = load_registry(settings.definitions_module)
    views = streaming.stream_views(registry.views.values())
    started_ms = time.time_ns() // 1_000_000
    result = run_stream(
        settings,
        views,
        bounded_until_ms=report.last_event_ms + 1,
        options=JobOptions(parallelism=settings.flink_parallelism),
        echo=lambda line: console.print(f"  {line}"),
    )
    return started_ms, sum(v.events for v in result.views.values())


def _compare(settings: Settings, console: Console, started_ms: int, flink_events: int) -> None:
    """Every row the stream emitted must equal the row Spark computed from the archive."""
    import pyarrow.compute as pc

    import streaming
    from batch.offline_store import read_offline
    from features.registry import load_registry
    from streaming.compile import features_topic

    views = streaming.stream_views(load_registry(settings.definitions_module).views.values())
    console.rule("10. training-serving consistency: every Flink row = Spark's offline row")
    compared = agree = 0
    for view in views:
        names = [f.name for f in view.features()]
        offline = read_offline("pyarrow", settings, view)
        batch = {
            (key, stamp // 1000): values
            for key, stamp, values in zip(
                offline[view.entity.join_key].to_pylist(),
                pc.cast(offline["event_timestamp"], "int64").to_pylist(),  # micros
                offline.select(names).to_pylist(),
                strict=True,
            )
        }
        for msg in read_topics(settings, [features_topic(view.name)]):
            row = FeatureRow.decode(msg.value())
            if row.emitted_at_ms < started_ms:
                continue  # an earlier run's, when the stack was already up
            want = batch.get((row.entity_key, row.window_end_ms))
            compared += 1
            agree += want is not None and all(_same(want[n], row.values[n]) for n in names)
        console.print(f"{view.name}: {len(batch)} offline rows")
    console.print(
        f"{compared} rows Flink emitted: {agree} equal Spark's (floats within 1e-9); "
        f"Flink read {flink_events} events"
    )
    if agree != compared or compared == 0:
        raise SystemExit(1)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _check(
    console: Console, report: ProduceReport, counts: IngestCounts, archived: ArchiveCounts
) -> None:
    console.rule("5. nothing lost")
    expected = dict(report.expected_rejections)
    ok = (
        counts.balanced()
        and counts.received == report.events
        and dict(counts.by_reason) == expected
        and archived.archived == counts.valid
    )
    console.print(
        f"produced {report.events} = ingested {counts.received} = "
        f"{counts.valid} valid + {counts.dead_lettered} dead-lettered; "
        f"rejections by reason {'match' if ok else 'DO NOT match'} the injected ones; "
        f"archived {archived.archived} of the {counts.valid} valid events"
    )
    if not ok:
        raise SystemExit(1)


def _monitor(settings: Settings, console: Console) -> None:
    """The monitor reads the prediction log, feedback and feature rows the demo produced."""
    from cli.monitor import print_summary
    from monitoring.runner import run_monitor

    console.rule("14. sluice monitor: drift, freshness, live error, skew from the prediction log")
    summary = run_monitor(settings, idle_timeout_s=5.0)
    print_summary(console, summary)
    console.print(
        "dashboard: `sluice monitor --serve` -> "
        f"http://{settings.monitor_host}:{settings.monitor_port}/"
    )
