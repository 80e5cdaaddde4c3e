"""bench.stream's comparison jobs and measurements: the parse-only PyFlink baseline, the Flink
SQL decode-only ceiling, the tile engine's SQL alone, the RSS of the local Flink cluster, and
the same job on a session cluster of its own (see bench/stream.py)."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.settings import Settings
from core.stream_stats import PrepareCounts
from examples.delivery.features import restaurant_orders, zone_couriers
from examples.delivery.sources import COURIER_PINGS, ORDERS
from features.definitions import FeatureView, Window
from streaming.compile import CompiledView, compile_view, source_table_sql
from streaming.functions import subtask_index
from streaming.job import JobOptions, flink_configuration
from streaming.monitor import StatsBoard
from streaming.sinks import JobContext, StatsReporter, now_ms


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return out


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 when it is gone)."""
    return _stat_cpu_s(Path(f"/proc/{pid}/stat"))


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# HotSpot's JIT compiler threads, as Linux names them (15 characters at most).
JIT_THREADS = ("C1 CompilerThre", "C2 CompilerThre")


def _jit_threads(pid: int) -> list[Path]:
    """The /proc stat files of a JVM's JIT compiler threads (HotSpot starts and stops them
    with the compile queue's length, so they are looked up again from time to time)."""
    found: list[Path] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            if task.joinpath("comm").read_text().strip() in JIT_THREADS:
                found.append(task / "stat")
        except OSError:
            continue
    return found


def _stat_cpu_s(stat: Path) -> float:
    """User + system CPU seconds of a process or thread (its /proc stat file) so far."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flink_pids() -> list[int]:
    """The local Flink cluster: this process (PyFlink runs a local job's Python workers inside
    the client, in "loopback" mode: pyflink/datastream/stream_execution_environment._open),
    every JVM under it and all those started (Linux /proc)."""
    found, stack = [os.getpid()], list(_children(os.getpid()))
    inside: set[int] = set()
    while stack:
        pid = stack.pop()
        try:
            command = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if command == "java" or pid in inside:
            found.append(pid)
            inside.update(_children(pid))
        stack += _children(pid)
    return found


def flink_rss_mb() -> float:
    """RSS of the local Flink cluster (flink_pids), in MB."""
    return sum(_rss_kb(pid) for pid in flink_pids()) / 1024


class PeakRss:
    """While in the block, sampled every 0.5 s: the greatest flink_rss_mb() seen, and the CPU
    seconds the local Flink cluster spent (flink_pids: this process, where the Python workers
    run, and the JVM; a child's last half second before it exits is missed). CPU time, unlike
    wall time, hardly depends on what else the machine runs."""

    # Finding the cluster's processes walks every thread of the JVM (/proc/<pid>/task/*): in
    # this process, beside a local job's Python workers, that took about 5% of py-spy's samples
    # when done every half second. The processes live as long as the job: looked up again
    # every few seconds only.
    PIDS_EVERY_S = 5.0

    def __init__(self) -> None:
        self.peak = 0.0
        self._pids: list[int] = []
        self._pids_at = -self.PIDS_EVERY_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._java: dict[int, bool] = {}  # pid -> whether it is a JVM
        self._jit: list[Path] = []  # the JVMs' JIT compiler threads
        self._jit_first: dict[Path, float] = {}
        self._jit_last: dict[Path, float] = {}

    @property
    def cpu_s(self) -> float:
        return sum(last - self._first.get(pid, 0.0) for pid, last in self._last.items())

    @property
    def python_cpu_s(self) -> float:
        """The part of cpu_s that Python spent: every process of the cluster but the JVM (this
        one, with a local job's workers in loopback mode, or the workers' own processes).
        Python's CPU is what the engine's Python-side work changes; the JVM's is the SQL's."""
        return sum(
            last - self._first.get(pid, 0.0)
            for pid, last in self._last.items()
            if self._java.get(pid) is False
        )

    @property
    def jit_cpu_s(self) -> float:
        """The part of cpu_s that the JVMs' JIT compiler threads spent. Every bounded run is a
        new job whose generated classes are compiled anew: this is what the runs pay for it,
        which a long-running job pays once (a thread's last half second before it stops is
        missed)."""
        return sum(last - self._jit_first.get(t, 0.0) for t, last in self._jit_last.items())

    def _take(self, refresh: bool = False) -> None:
        if refresh or time.monotonic() - self._pids_at >= self.PIDS_EVERY_S:
            self._pids, self._pids_at = flink_pids(), time.monotonic()
            jvms = [pid for pid in self._pids if self._java.get(pid, _command(pid) == "java")]
            self._jit = [t for pid in jvms for t in _jit_threads(pid)]
        for thread in self._jit:
            used = _stat_cpu_s(thread)
            if used:
                self._jit_last[thread] = used
        pids = self._pids
        self.peak = max(self.peak, sum(_rss_kb(pid) for pid in pids) / 1024)
        for pid in pids:
            used = _cpu_s(pid)
            if used:
                self._last[pid] = used
                if pid not in self._java:
                    self._java[pid] = _command(pid) == "java"

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self._take()

    def __enter__(self) -> PeakRss:
        self._first = {pid: _cpu_s(pid) for pid in flink_pids()}
        jvms = [pid for pid in self._first if _command(pid) == "java"]
        self._jit_first = {t: _stat_cpu_s(t) for pid in jvms for t in _jit_threads(pid)}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take(refresh=True)


def month_view(view: FeatureView) -> FeatureView:
    """``view`` with every window 30 days on 1-minute slides (43,200 tiles per key): the
    bench's 30-day job (bench.stream's tiles-30d, bench.stream_windows)."""
    month = (Window.sliding("30d", "1m"),)
    aggregations = tuple(a.model_copy(update={"windows": month}) for a in view.aggregations)
    return view.model_copy(update={"aggregations": aggregations})


def _source_tables(
    t_env: Any, settings: Settings, stop: dict[str, dict[int, int]], name: str
) -> list[tuple[CompiledView, str]]:
    """Register the Java functions and, per bench view, a source table ``<name>_<view>`` read
    up to ``stop`` with the tile engine's event-time column (its own consumer group,
    bench-<name>-...): (compiled view, table) pairs."""
    from streaming.tiles import rowtime_column
    from streaming.udf import FUNCTIONS

    for function, java_class in FUNCTIONS.items():
        t_env.create_java_temporary_system_function(function, java_class)
    out = []
    for view in (restaurant_orders, zone_couriers):
        compiled = compile_view(view)
        table = f"{name}_{view.name}"
        group = f"bench-{name.replace('_', '-')}-"
        t_env.execute_sql(
            source_table_sql(
                compiled,
                table,
                settings.kafka_bootstrap,
                {},
                stop[compiled.topic],
                rowtime=rowtime_column(compiled),
            ).replace("sluice-stream-", group)
        )
        out.append((compiled, table))
    return out


def ceiling(settings: Settings, stop: dict[str, dict[int, int]], parallelism: int) -> float:
    """Wall seconds of a Flink SQL job that reads and decodes what the tile engine decodes
    (its marked view: JSON columns, derived columns, filter, late check) into a blackhole."""
    from pyflink.table import EnvironmentSettings, TableEnvironment

    from streaming.tiles import tile_query
    from streaming.udf import udf_jar

    started = time.monotonic()
    t_env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
    config = t_env.get_config()
    config.set("parallelism.default", str(parallelism))
    config.set("table.local-time-zone", "UTC")
    config.set("pipeline.jars", udf_jar(settings.state_dir).resolve().as_uri())
    statements = t_env.create_statement_set()
    for compiled, table in _source_tables(t_env, settings, stop, "ceiling"):
        views, _ = tile_query(compiled, table)
        t_env.execute_sql(views[0])  # the marked view: decode, derive, filter, late check
        t_env.execute_sql(
            f"CREATE TEMPORARY TABLE `{table}_sink` (n BIGINT) WITH ('connector' = 'blackhole')"
        )
        statements.add_insert_sql(
            f"INSERT INTO `{table}_sink` SELECT CAST(`_part` AS BIGINT) + `_off` + "
            f"COALESCE(`_t`, 0) + CHAR_LENGTH(COALESCE(`_k0`, '')) + "
            f"CASE WHEN `_kept` AND NOT `_side` THEN 1 ELSE 0 END FROM `{table}_marked`"
        )
    statements.execute().wait()
    return time.monotonic() - started


def tile_environment(
    settings: Settings, name: str, options: JobOptions, extra_jars: tuple[Path, ...] = ()
) -> tuple[Any, Any]:
    """(StreamExecutionEnvironment, StreamTableEnvironment) of a bench job that runs tile
    queries: the job's own Flink configuration (streaming/job.py) and table settings, the
    Java functions' jar and ``extra_jars`` on pipeline.jars."""
    from pyflink.common import Configuration
    from pyflink.datastream import StreamExecutionEnvironment
    from pyflink.table import StreamTableEnvironment

    from streaming.tiles import TABLE_CONFIG
    from streaming.udf import udf_jar

    conf = Configuration()
    base = settings.state_dir / "flink" / name
    for key, value in flink_configuration(
        base, name, options, bounded=True, restore_from=None
    ).items():
        conf.set_string(key, value)
    jars = (udf_jar(settings.state_dir), *extra_jars)
    conf.set_string("pipeline.jars", ";".join(j.resolve().as_uri() for j in jars))
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    t_env = StreamTableEnvironment.create(env)
    t_env.get_config().set("table.local-time-zone", "UTC")
    for key, value in TABLE_CONFIG.items():
        t_env.get_config().set(key, value)
    return env, t_env


def tiles_sql(settings: Settings, stop: dict[str, dict[int, int]], options: JobOptions) -> float:
    """Wall seconds of the tile engine's whole query (streaming/tiles.py: decode, late check,
    deduplication, tiles, read counts) into a blackhole, no Python: what the SQL side costs,
    against the ceiling (decode only) and the full job (the Python operator on top). The
    job's own Flink configuration (streaming/job.py), so the two differ only in the Python."""
    from pyflink.table import TableDescriptor

    from streaming.tiles import keyed_by_shard, tile_query

    started = time.monotonic()
    _, t_env = tile_environment(settings, "bench-tiles-sql", options)
    statements = t_env.create_statement_set()
    for compiled, table in _source_tables(t_env, settings, stop, "tiles_sql"):
        views, query = tile_query(compiled, table)
        for statement in views:
            t_env.execute_sql(statement)
        # Every column, as the job keys them: a sink of a few columns would let the planner
        # prune the aggregates the others need (and measure less than the job runs).
        rows = t_env.sql_query(keyed_by_shard(compiled, query))
        statements.add_insert(TableDescriptor.for_connector("blackhole").build(), rows)
    statements.execute().wait()
    return time.monotonic() - started


def baseline(
    settings: Settings, stop: dict[str, dict[int, int]], parallelism: int, python_mode: str
) -> float:
    """Wall seconds of the same source into a Python function that only parses each event;
    ``python_mode`` "process" (PyFlink's default: the issue's reference) or "thread"."""
    from pyflink.common import Configuration
    from pyflink.datastream import ProcessFunction, StreamExecutionEnvironment
    from pyflink.table import StreamTableEnvironment

    started = time.monotonic()
    run_id = uuid.uuid4().hex[:12]
    ctx = JobContext(settings, run_id)
    conf = Configuration()
    options = JobOptions(parallelism=parallelism, python_mode=python_mode)
    base = settings.state_dir / "flink" / "bench-baseline"
    for key, value in flink_configuration(
        base, "bench-baseline", options, bounded=True, restore_from=None
    ).items():
        conf.set_string(key, value)
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    t_env = StreamTableEnvironment.create(env)

    class ParseOnly(ProcessFunction):  # type: ignore[misc]
        def __init__(self, view: str) -> None:
            self.view = view

        def open(self, runtime_context: Any) -> None:
            import orjson

            from core.kafka import CountingProducer

            self.loads = orjson.loads
            self.counts = PrepareCounts()
            self.producer = CountingProducer(settings)
            index = subtask_index(runtime_context)  # also in thread mode
            self.stats = StatsReporter(self.producer, ctx, self.view, index)

        def process_element(self, row: Any, context: Any) -> None:
            self.loads(row[1])
            self.counts.events += 1
            self.counts.last_at_ms = now_ms()
            self.counts.first_at_ms = self.counts.first_at_ms or self.counts.last_at_ms

        def close(self) -> None:
            self.stats.report(self.counts, final=True)
            self.producer.flush()

    board = StatsBoard(settings, run_id)
    for view in (restaurant_orders, zone_couriers):
        compiled = compile_view(view)
        table = f"baseline_{view.name}"
        t_env.execute_sql(
            source_table_sql(
                compiled, table, settings.kafka_bootstrap, {}, stop[compiled.topic]
            ).replace("sluice-stream-", "bench-baseline-")
        )
        t_env.to_data_stream(t_env.from_path(table)).process(ParseOnly(view.name))
    env.execute("bench-baseline")
    seconds = time.monotonic() - started
    deadline = time.monotonic() + 15
    while board.finals() < 2 * parallelism and time.monotonic() < deadline:
        board.poll()
    report = board.report(
        [restaurant_orders.name, zone_couriers.name],
        {restaurant_orders.name: ORDERS.topic, zone_couriers.name: COURIER_PINGS.topic},
    )
    board.close()
    events = sum(v.events for v in report.values())
    assert events == sum(sum(o.values()) for o in stop.values()), "not every event was read"
    return seconds


def on_cluster(
    settings: Settings,
    measure: Callable[[Settings, JobOptions], tuple[float, float]],
    options: JobOptions,
) -> tuple[float, float]:
    """``measure`` (bench.stream's marginal rate of a job) with the job submitted to a
    `up --cluster` session cluster of its own (one TaskManager, checkpoints in its bucket
    through the mount) instead of the local mini-cluster; the same broker and Redis."""
    from bench.cluster import own_cluster

    with own_cluster(settings, "bench-stream") as cluster:
        assert cluster.flink_jobmanager
        return measure(cluster, dataclasses.replace(options, jobmanager=cluster.flink_jobmanager))
