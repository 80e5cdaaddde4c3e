"""streaming.run: start the job, print progress, stop it cleanly, report what it did."""

from __future__ import annotations

import dataclasses
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from types import FrameType

from core.kafka import ensure_topics
from core.settings import Settings
from core.uris import JvmAccess, S3Options
from features.definitions import FeatureView
from streaming.compile import CompiledView, compile_view, features_topic
from streaming.errors import StreamJobError
from streaming.job import JobOptions, build_job, job_dir, job_name, latest_snapshot
from streaming.monitor import StatsBoard, StreamReport, ViewReport, stop_offsets_before
from streaming.sinks import STATS_TOPIC, JobContext

POLL_S = 0.5
STOP_TIMEOUT_S = 120.0
FINAL_STATS_TIMEOUT_S = 15.0


def run(
    settings: Settings,
    views: Iterable[FeatureView],
    *,
    bounded_until_ms: int | None = None,
    stop_at_offsets: Mapping[str, Mapping[int, int]] | None = None,
    options: JobOptions | None = None,
    restore: bool = True,
    report_every_s: float = 10.0,
    echo: Callable[[str], None] = print,
    should_stop: Callable[[], bool] = lambda: False,
) -> StreamReport:
    """Run the stream job of ``views`` until it ends, Ctrl-C (SIGINT) or ``should_stop()``.

    Unbounded (the default): restores the newest checkpoint or savepoint of the same set of
    views under settings.state_dir (else reads from the earliest offsets) and runs until
    stopped; a stop takes a savepoint, which the next run resumes from.
    Bounded, for backfills, demos and tests (fresh state, nothing retained):
      bounded_until_ms: each partition is read up to its first record stamped at or after it
        (or its end); stop_at_offsets: topic -> partition -> offset (exclusive), every
        partition of every source topic. At the end of the input the watermark goes to
        +infinity, so every window and closing row is emitted before the job finishes.
    """
    options = options or JobOptions()
    if options.engine is None:
        options = dataclasses.replace(options, engine=settings.stream_engine)
    if options.python_mode is None:
        options = dataclasses.replace(options, python_mode=settings.flink_python_mode)
    compiled = [compile_view(v) for v in views]
    if not compiled:
        raise StreamJobError("no views to run")
    topics = sorted({c.topic for c in compiled})
    ensure_topics(
        settings,
        topics + [features_topic(c.name) for c in compiled] + [settings.dead_letter_topic],
    )
    ensure_topics(settings, [STATS_TOPIC], partitions=1)
    stop_offsets = _stop_offsets(settings, topics, bounded_until_ms, stop_at_offsets)
    bounded = stop_offsets is not None
    name = job_name(compiled)
    restore_from = (
        latest_snapshot(
            job_dir(settings, compiled, options.engine, options.python_mode),
            S3Options.from_settings(settings),
        )
        if restore and not bounded
        else None
    )
    jvm = JvmAccess.from_settings(settings)
    run_id = uuid.uuid4().hex[:12]
    echo(
        f"starting {name} ({'bounded' if bounded else 'unbounded'}, run {run_id}"
        + (f", restoring {restore_from}" if restore_from else ", fresh state")
        + ")"
    )
    ctx = JobContext(settings=settings, run_id=run_id)
    board = StatsBoard(settings, run_id)
    started = time.monotonic()
    # From here on Ctrl-C stops the job cleanly instead of killing the driver half way.
    interrupted = threading.Event()
    restore_sigint = _install_sigint(interrupted)
    try:
        env = build_job(
            settings, compiled, ctx, options, stop_offsets=stop_offsets, restore_from=restore_from
        )
        client = env.execute_async(name)
        status, savepoint = _wait(
            client,
            board,
            compiled,
            bounded,
            report_every_s,
            echo,
            interrupted,
            should_stop,
            savepoint_dir=jvm.for_flink(
                job_dir(settings, compiled, options.engine, options.python_mode).join("savepoints")
            ),
        )
        # Operators send their final counts as they close; wait for them a little.
        deadline = time.monotonic() + FINAL_STATS_TIMEOUT_S
        expected_finals = 3 * len(compiled) * options.parallelism
        while board.finals() < expected_finals and time.monotonic() < deadline:
            board.poll()
        report = StreamReport(
            views=board.report([c.name for c in compiled], {c.name: c.topic for c in compiled}),
            status=status,
            seconds=time.monotonic() - started,
            # As settings name it: s3://... when Flink wrote it through a bucket mount.
            savepoint=None if savepoint is None else str(jvm.from_engine(savepoint)),
        )
    finally:
        restore_sigint()
        board.close()
    echo(f"{name} {status.lower()} after {report.seconds:.1f} s")
    for view, v in report.views.items():
        echo(_progress_line(view, v, None))
    return report


def _stop_offsets(
    settings: Settings,
    topics: list[str],
    bounded_until_ms: int | None,
    given: Mapping[str, Mapping[int, int]] | None,
) -> dict[str, dict[int, int]] | None:
    if bounded_until_ms is not None and given is not None:
        raise StreamJobError("give bounded_until_ms or stop_at_offsets, not both")
    if bounded_until_ms is not None:
        return {t: stop_offsets_before(settings, t, bounded_until_ms) for t in topics}
    if given is None:
        return None
    missing = [t for t in topics if t not in given]
    if missing:
        raise StreamJobError(f"stop_at_offsets has no offsets for {missing}")
    return {t: dict(given[t]) for t in topics}


def _install_sigint(flag: threading.Event) -> Callable[[], None]:
    """Ctrl-C sets ``flag``; the wait loop then stops the job cleanly. Main thread only.

    The JVM that PyFlink starts ignores SIGINT, so the job outlives the keypress and is
    stopped by us, with a savepoint. A second Ctrl-C gives up waiting (KeyboardInterrupt);
    the next start then resumes from the last checkpoint instead. Returns what puts the
    previous handler back.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(_signum: int, _frame: FrameType | None) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    previous = signal.signal(signal.SIGINT, handler)

    def restore() -> None:
        signal.signal(signal.SIGINT, previous)

    return restore


def _wait(
    client: object,
    board: StatsBoard,
    compiled: list[CompiledView],
    bounded: bool,
    report_every_s: float,
    echo: Callable[[str], None],
    interrupted: threading.Event,
    should_stop: Callable[[], bool],
    savepoint_dir: str | None = None,
) -> tuple[str, str | None]:
    """Follow the job until it ends or is stopped; (final status, savepoint path or None)."""
    result = client.get_job_execution_result()  # type: ignore[attr-defined]
    names = [c.name for c in compiled]
    topics = {c.name: c.topic for c in compiled}
    last_report = time.monotonic()
    previous: dict[str, ViewReport] | None = None
    while not result.done():
        board.poll(POLL_S)
        if interrupted.is_set() or should_stop():
            echo("stopping: " + ("cancelling the bounded run" if bounded else "taking a savepoint"))
            return _stop(client, result, bounded, savepoint_dir)
        if time.monotonic() - last_report >= report_every_s:
            elapsed = time.monotonic() - last_report
            last_report = time.monotonic()
            current = board.report(names, topics)
            for view, v in current.items():
                before = previous.get(view) if previous else None
                rate = (v.events - (before.events if before else 0)) / elapsed
                echo(_progress_line(view, v, rate))
            previous = current
    try:
        result.result()
    except Exception as exc:
        raise StreamJobError(f"the stream job failed: {_root_cause(exc)}") from exc
    return "FINISHED", None


def _stop(
    client: object, result: object, bounded: bool, savepoint_dir: str | None = None
) -> tuple[str, str | None]:
    savepoint = None
    if bounded:
        client.cancel()  # type: ignore[attr-defined]
    else:
        savepoint = _await(_stop_with_savepoint(client, savepoint_dir), "stop with a savepoint")
    _await(result, "the job to end", ignore_errors=True)
    return ("CANCELED" if bounded else "STOPPED"), savepoint


def _stop_with_savepoint(client: object, directory: str | None = None) -> object:
    """JobClient.stopWithSavepoint; PyFlink 2.0's wrapper still calls the removed 2-argument
    Java method, so the 3-argument one (with the savepoint format) is called directly. The
    directory is the job's execution.checkpointing.savepoint-dir."""
    from pyflink.common.completable_future import CompletableFuture
    from pyflink.java_gateway import get_gateway

    formats = get_gateway().jvm.org.apache.flink.core.execution.SavepointFormatType
    j_client = client._j_job_client  # type: ignore[attr-defined]
    # The directory is given explicitly: a session cluster does not read the job's
    # savepoint-dir setting when asked to stop it.
    return CompletableFuture(j_client.stopWithSavepoint(False, directory, formats.CANONICAL), str)


def _await(future: object, what: str, *, ignore_errors: bool = False) -> str | None:
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while not future.done():  # type: ignore[attr-defined]
        if time.monotonic() > deadline:
            raise StreamJobError(f"timed out after {STOP_TIMEOUT_S:.0f} s waiting for {what}")
        time.sleep(0.2)
    try:
        value = future.result()  # type: ignore[attr-defined]
    except Exception as exc:
        if ignore_errors:
            return None
        raise StreamJobError(f"{what} failed: {_root_cause(exc)}") from exc
    return value if isinstance(value, str) else None


_PYTHON_ERROR = re.compile(r"^(?!java\.|org\.|scala\.)[\w.]+(Error|Exception): .+")


def _root_cause(exc: BaseException) -> str:
    """What went wrong, in one line: the last Python error a worker raised (its traceback
    travels inside Java exceptions), else the innermost Java 'Caused by', else line one."""
    lines = str(exc).splitlines()
    python = [line for line in lines if _PYTHON_ERROR.match(line)]
    causes = [line for line in lines if line.startswith("Caused by:")]
    found = python or causes or lines or [repr(exc)]
    return found[-1][:500]


def _progress_line(view: str, v: ViewReport, rate: float | None) -> str:
    watermark = "-"
    if v.watermark is not None and abs(v.watermark) < 2**62:
        watermark = datetime.fromtimestamp(v.watermark / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    parts = [
        f"{view}: {v.events:,} events",
        f"{rate:,.0f}/s" if rate is not None else f"{v.events / max(v.busy_s, 1e-3):,.0f}/s busy",
        f"late {v.late:,}",
        f"filtered {v.filtered:,}",
        f"duplicates {v.duplicates:,}",
        f"rows {v.rows:,}",
        f"lag {v.lag:,}" if v.lag is not None else "lag ?",
        f"watermark {watermark}",
        # Ingest's heartbeats read: above 0, the job runs (tests wait for it).
        f"heartbeats {v.heartbeats:,}",
    ]
    return ", ".join(parts)
