"""`sluice demo`: the pipeline end to end on the local stack, as far as it is built."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta

from rich.console import Console
from rich.table import Table

from core.kafka import read_topics
from core.records import DeadLetter, FeatureRow
from core.settings import Settings
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
    try:
        report = _produce(settings, console, events)
        counts = _ingest(settings, console, report)
        _show_dead_letters(settings, console, limit=5)
        _check(console, report, counts)
        _backfill_and_serve(settings, console, report)
        _stream(settings, console, report)
        train_serve_and_predict(settings, console)
    finally:
        if keep_up or already_running:
            console.print("stack left running (`sluice down` stops it)")
        else:
            console.rule("stack down")
            stack_down(settings)
            console.print("broker and Redis stopped")


def _produce(settings: Settings, console: Console, events: int) -> ProduceReport:
    console.rule("2. produce synthetic delivery traffic (2% malformed on purpose)")
    report = produce_synthetic(
        settings, events, corrupt_fraction=0.02, history_dir=settings.history_dir
    )
    console.print(
        f"{report.events} events to raw topics in {report.seconds:.2f} s "
        f"({report.rate:,.0f}/s); by source: {dict(report.by_source)}"
    )
    console.print(f"history written to {settings.history_dir}: {report.history_rows}")
    return report


def _ingest(settings: Settings, console: Console, report: ProduceReport) -> IngestCounts:
    console.rule("3. validating ingest: raw topics -> event topics + dead-letter topic")
    started = time.monotonic()
    counts = run_ingest(settings, SOURCES, idle_timeout_s=3.0, max_events=report.events)
    seconds = time.monotonic() - started
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
    return counts


def _show_dead_letters(settings: Settings, console: Console, limit: int) -> None:
    console.rule(f"4. a few dead letters ({settings.dead_letter_topic})")
    for msg in read_topics(settings, [settings.dead_letter_topic], limit=limit):
        reason = DeadLetter.from_headers(msg.headers()).error
        console.print(f"- {reason}\n  original: {(msg.value() or b'')[:90]!r}")


def _backfill_and_serve(settings: Settings, console: Console, report: ProduceReport) -> None:
    """Feast registry, a Spark backfill of the produced history, and online reads."""
    from batch.backfill import backfill
    from feature_repo.online_store import open_online_store
    from feature_repo.registry_ops import apply
    from features.registry import load_registry

    console.rule("6. feast apply: definitions -> Feast registry")
    registry = load_registry(settings.definitions_module)
    changes = apply(settings, registry)
    console.print(f"{len(changes)} registry changes applied to {settings.feast_registry}")

    console.rule("7. Spark backfill of the history -> offline store + online store")
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

    console.rule("8. online values (Redis, Feast layout)")
    view = registry.views["restaurant_orders"]
    with open_online_store(settings) as store:
        keys = [f"r{n:05d}" for n in range(5)]
        for key, row in zip(keys, store.read(view, keys), strict=True):
            if row is None:
                console.print(f"{key}: no value yet")
                continue
            end = datetime.fromtimestamp(row.window_end_ms / 1000, UTC).isoformat()
            console.print(f"{key} @ window end {end}: {dict(row.values)}")


def _stream(settings: Settings, console: Console, report: ProduceReport) -> None:
    """A bounded Flink run over the same events; its rows must equal Spark's offline rows."""
    import pyarrow.compute as pc

    import streaming
    from batch.offline_store import read_offline
    from features.registry import load_registry
    from streaming.compile import features_topic
    from streaming.job import JobOptions
    from streaming.runner import run as run_stream

    console.rule("9. Flink over the same events -> Redis + features.<view> topics")
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
        f"Flink read {sum(v.events for v in result.views.values())} events"
    )
    if agree != compared or compared == 0:
        raise SystemExit(1)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _check(console: Console, report: ProduceReport, counts: IngestCounts) -> None:
    console.rule("5. nothing lost")
    expected = dict(report.expected_rejections)
    ok = (
        counts.balanced()
        and counts.received == report.events
        and dict(counts.by_reason) == expected
    )
    console.print(
        f"produced {report.events} = ingested {counts.received} = "
        f"{counts.valid} valid + {counts.dead_lettered} dead-lettered; "
        f"rejections by reason {'match' if ok else 'DO NOT match'} the injected ones"
    )
    if not ok:
        raise SystemExit(1)
