"""Build the Flink job for a set of views: environment, checkpoints, one pipeline per view.

Per view:  Kafka `events.<source>` (SQL table: key, value, partition, offset, heartbeat flag,
WATERMARK on the record timestamp) -> to_data_stream -> Prepare (drops heartbeats) ->
key_by(entity) -> Windows, which writes the rows to Redis and the features topic.

On time (features/contract.py: a window ending at E is servable at E + view.lateness, and its
row must be readable by then): the watermark passes E once every partition holds a record
stamped at or past E + allowed_lateness. Ingest writes heartbeats to quiet partitions, stamped
with the wall clock (events/ingest.py), so quiet keys, partitions and whole topics move on;
JobOptions.idle_timeout_s optionally lets partitions that nothing writes stop holding the
watermark. From there: the source emits the watermark within watermark_interval_ms, each Python
operator forwards it at its bundle's end (at most bundle_time_ms), the timer fires and the rows
are written at the end of that bundle. So a row is readable about allowed_lateness + (up to one
heartbeat interval when quiet) + 3 x 100 ms after E: 2 s + ~1.5 s against a lateness of 5 s by
default (measured: tests/integration/test_stream_on_time.py).
Python operators run in PyFlink's thread mode by default (settings.flink_python_mode), with the
bundle ends of streaming/python_operators.py that keep the writers at least once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.settings import Settings
from core.shipping import code_archive, import_roots
from core.uris import JvmAccess, S3Options, StorageUri, filesystem, parse
from streaming import python_operators, tile_state
from streaming import tiles as tile_sql
from streaming.compile import CompiledView, source_query, source_table_sql
from streaming.errors import StreamJobError
from streaming.java_windows import TILE_ENGINES
from streaming.sinks import JobContext
from streaming.tiles import TABLE_CONFIG, keyed_by_shard, rowtime_column, tile_query


@dataclass(frozen=True)
class JobOptions:
    parallelism: int = 1
    checkpoint_interval_s: float = 10.0
    # Python bundles: rows reach Redis at most about two bundle times after the watermark
    # passed their end. Shorter bundles cost throughput (bench/stream.py measures both).
    bundle_time_ms: int = 100
    bundle_size: int = 5000
    # How often sources emit watermarks, and the longest a record waits in a network buffer
    # between operators (Flink's default is 100 ms): both add to freshness.
    watermark_interval_ms: int = 100
    buffer_timeout_ms: int = 50
    # The longest a Kafka fetch may wait for data. Apache Kafka answers as soon as a record
    # arrives; Tansu waits about 200 ms regardless (measured), which lower values cut.
    fetch_max_wait_ms: int = 50
    # Flink's processing-time idleness (scan.watermark.idle-timeout, live runs only): a
    # partition without records for this long stops holding the watermark back. Off by
    # default: quiet partitions of topics that ingest writes get its heartbeats, which move
    # their event time on in band, in order with their events. Idleness is not in band: while
    # a job catches up on a backlog, a partition whose records the source has not reached yet
    # looks idle, the others move the watermark ahead, and its whole backlog arrives late
    # (measured here with 2 s over a 30 s backlog: 22-42% of the events dead-lettered; Tansu
    # fills a fetch from one partition before the next, Kafka's per-partition limit bounds
    # the skew but does not remove it). Set it (above ingest's heartbeat interval, below the
    # views' lateness - allowed_lateness) only for topics that something other than ingest
    # writes, leaving partitions without records.
    idle_timeout_s: float = 0.0
    restart_attempts: int = 3
    # "host:port" of a Flink JobManager's REST endpoint; empty: a local mini-cluster.
    jobmanager: str = ""
    # "events": Python per event (streaming/functions.py); "tiles": SQL per event, Python per
    # tile (streaming/tiles.py); "tiles-java": the same SQL, windows assembled in the JVM and
    # Python per row written online (streaming/java_windows.py). A view the tile engines
    # cannot run exactly runs per event.
    # None: settings.stream_engine (streaming.runner.run resolves it).
    engine: str | None = None
    # PyFlink's python.execution-mode: "thread" (PEMJA: the interpreter embedded in the
    # TaskManager's JVM; the venv's site-packages go on its python.pythonpath) or "process"
    # (Beam workers). Both are at least once: Python functions run in
    # streaming/python_operators.py's operators, which in thread mode end a bundle before
    # every checkpoint barrier (Flink 2.0's own embedded operators never do). None:
    # settings.flink_python_mode (streaming.runner.run resolves it).
    python_mode: str | None = None
    # Where a remote job's code archive (python.files) is built; None: a temporary folder.
    code_dir: Path | None = None
    # Packages shipped beside the checkout's own (the definitions module's, when elsewhere).
    ship_packages: tuple[str, ...] = ()


def job_name(views: list[CompiledView]) -> str:
    return "sluice-stream-" + "-".join(sorted(c.name for c in views))


def uses_tiles(compiled: CompiledView, options: JobOptions) -> bool:
    from streaming.tiles import tile_support

    return options.engine in TILE_ENGINES and tile_support(compiled) is None


def job_dir(
    settings: Settings,
    views: list[CompiledView],
    engine: str | None = None,
    python_mode: str | None = None,
) -> StorageUri:
    """Checkpoints and savepoints of one set of view definitions (and engine and Python mode,
    None: the settings') live here: under settings.flink_checkpoint_dir (a URI the cluster
    shares) or <state_dir>/flink.

    The directory names a hash of the definitions: tiles in a snapshot are laid out for the
    definitions that wrote them, so a changed view starts afresh (from the earliest offsets)
    instead of restoring state it would misread. So does a change of engine (their state differs),
    and one to thread mode (its Python state has other serializers than process mode's).
    """
    definitions = b"".join(
        c.view.model_dump_json().encode() for c in sorted(views, key=lambda c: c.name)
    )
    engine = engine or settings.stream_engine
    if engine != "events":
        definitions += f"engine={engine}".encode()
    if engine in TILE_ENGINES:  # and the layout of its query's plan
        definitions += f"/plan={tile_sql.PLAN_VERSION}/shards={tile_state.SHARDS}".encode()
    # A process-mode job keeps the directory it had before the setting existed.
    if (python_mode or settings.flink_python_mode) == "thread":
        definitions += b"/python=thread"
    digest = hashlib.sha256(definitions).hexdigest()[:12]
    root = parse(
        settings.flink_checkpoint_dir or settings.state_dir / "flink", "flink_checkpoint_dir"
    )
    return root.join(f"{job_name(views)}-{digest}")


def latest_snapshot(directory: Path | StorageUri, s3: S3Options | None = None) -> str | None:
    """The URI of the newest completed checkpoint or savepoint (its directory holds _metadata),
    listed through core/uris, so a shared object store works as a local directory does."""
    import pyarrow.fs as pafs

    fs, root = filesystem(directory, s3, "flink_checkpoint_dir")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise StreamJobError(f"cannot list snapshots under {parse(directory)}: {exc}") from None
    found = []
    for info in infos:
        rel = info.path[len(root) :].strip("/").split("/")
        if info.base_name != "_metadata" or info.type != pafs.FileType.File:
            continue
        if (len(rel) == 4 and rel[0] == "checkpoints" and rel[2].startswith("chk-")) or (
            len(rel) == 3 and rel[0] == "savepoints"
        ):
            found.append(info)
    if not found:
        return None
    newest = max(found, key=lambda i: (i.mtime_ns or 0, i.path))
    return str(parse(directory).join(newest.path[len(root) :].strip("/").rsplit("/", 1)[0]))


def flink_configuration(
    base: Path | StorageUri,
    name: str,
    options: JobOptions,
    *,
    bounded: bool,
    restore_from: Path | str | None,
    jvm: JvmAccess | None = None,
) -> dict[str, str]:
    """Flink settings of the job; ``base`` holds its checkpoints and savepoints (``jvm``: how
    the cluster reaches s3://, natively or through a bucket mount; core/uris.py)."""
    jvm = jvm or JvmAccess()
    where = parse(base, "flink_checkpoint_dir")
    conf = {
        "python.executable": sys.executable,
        "python.client.executable": sys.executable,
        "python.fn-execution.bundle.time": str(options.bundle_time_ms),
        "python.fn-execution.bundle.size": str(options.bundle_size),
        "python.metric.enabled": "true",  # the bundle-end hook is a gauge (functions.py)
        "parallelism.default": str(options.parallelism),
        "pipeline.name": name,
        "pipeline.auto-watermark-interval": f"{options.watermark_interval_ms} ms",
        "execution.buffer-timeout.interval": f"{options.buffer_timeout_ms} ms",
        "state.backend.type": "hashmap",
        # Chained operators pass records on without a copy: the SQL operators are written for
        # it, and this project's Java and Python functions keep no reference to an input
        # record (TileWindows copies the fields it keeps). Without it every record between the
        # tile query's chained operators was copied (RowDataSerializer.copy: a tenth of the
        # window aggregation's thread, async-profiler, 2026-12-07).
        "pipeline.object-reuse": "true",
        "execution.checkpointing.interval": f"{int(options.checkpoint_interval_s * 1000)} ms",
        "execution.checkpointing.dir": jvm.for_flink(where.join("checkpoints")),
        "execution.checkpointing.savepoint-dir": jvm.for_flink(where.join("savepoints")),
        # A cancelled or stopped live job leaves its last checkpoint for the next start; a
        # bounded run is finished when it ends and leaves none behind.
        "execution.checkpointing.externalized-checkpoint-retention": (
            "DELETE_ON_CANCELLATION" if bounded else "RETAIN_ON_CANCELLATION"
        ),
        "restart-strategy.type": "fixed-delay",
        "restart-strategy.fixed-delay.attempts": str(options.restart_attempts),
        "restart-strategy.fixed-delay.delay": "5 s",
    }
    if options.python_mode not in (None, "process", "thread"):
        raise StreamJobError(f"python_mode {options.python_mode!r} is not process or thread")
    if options.python_mode is not None:  # None: PyFlink's default (process)
        conf["python.execution-mode"] = options.python_mode
    if options.python_mode == "thread":
        import sysconfig

        # The interpreter embedded in the JVM reads no .pth file: the venv's packages, and
        # (local runs) the job's own code by path; a cluster's comes in python.files below.
        roots = [] if options.jobmanager else import_roots(options.ship_packages)
        conf["python.pythonpath"] = os.pathsep.join(
            [sysconfig.get_paths()["purelib"], *map(str, roots)]
        )
    if restore_from is not None:
        conf["execution.state-recovery.path"] = jvm.for_flink(restore_from)
    if options.jobmanager:
        host, _, port = options.jobmanager.rpartition(":")
        if not host or not port.isdigit():
            raise StreamJobError(f"jobmanager {options.jobmanager!r} is not host:port")
        conf |= {
            "execution.target": "remote",
            "rest.address": host,
            "rest.port": port,
            # The Python operators' runtime (pyflink/opt), shipped as `flink run -py` does.
            "pipeline.jars": _flink_python_jar().as_uri(),
        }
        # A cluster's Python workers run the job's code from what the job ships, not from
        # whatever version of Sluice their machine has installed.
        code_dir = options.code_dir or Path(tempfile.gettempdir()) / "sluice-flink-code"
        archive = code_archive(code_dir, options.ship_packages)
        conf["python.files"] = str(archive)
    return conf


def build_job(
    settings: Settings,
    views: list[CompiledView],
    ctx: JobContext,
    options: JobOptions,
    *,
    stop_offsets: dict[str, dict[int, int]] | None,
    restore_from: Path | str | None,
) -> Any:
    """A StreamExecutionEnvironment holding the job, ready for execute_async."""
    from pyflink.common import Configuration, Types
    from pyflink.datastream import StreamExecutionEnvironment
    from pyflink.table import StreamTableEnvironment

    from streaming.functions import flink_functions

    name = job_name(views)
    conf = Configuration()
    bounded = stop_offsets is not None
    if options.python_mode is None:
        options = dataclasses.replace(options, python_mode=settings.flink_python_mode)
    base = job_dir(settings, views, options.engine, options.python_mode)
    if options.jobmanager and options.code_dir is None:
        options = dataclasses.replace(
            options,
            code_dir=settings.state_dir / "flink",
            ship_packages=(settings.definitions_module,),
        )
    elif not options.ship_packages:  # thread mode's interpreter imports it by path
        options = dataclasses.replace(options, ship_packages=(settings.definitions_module,))
    for key, value in flink_configuration(
        base,
        name,
        options,
        bounded=bounded,
        restore_from=restore_from,
        jvm=JvmAccess.from_settings(settings),
    ).items():
        conf.set_string(key, value)
    tiles = any(uses_tiles(c, options) for c in views)
    if tiles or options.python_mode == "thread":  # the thread-mode operators are in it too
        from streaming.udf import udf_jar

        # Beside the Python runtime jar a session cluster needs (flink_configuration).
        jars = [
            conf.get_string("pipeline.jars", ""),
            udf_jar(settings.state_dir).resolve().as_uri(),
        ]
        conf.set_string("pipeline.jars", ";".join(j for j in jars if j))
    if options.jobmanager:
        # get_execution_environment always builds a local one; this one honours
        # execution.target=remote and submits to the session cluster.
        from pyflink.java_gateway import get_gateway

        jvm_env = get_gateway().jvm.org.apache.flink.streaming.api.environment
        env = StreamExecutionEnvironment(jvm_env.StreamExecutionEnvironment(conf._j_configuration))
    else:
        env = StreamExecutionEnvironment.get_execution_environment(conf)
    t_env = StreamTableEnvironment.create(env)
    if tiles:
        from streaming.udf import FUNCTIONS

        for function, java_class in FUNCTIONS.items():
            t_env.create_java_temporary_system_function(function, java_class)
    # Tumbling tiles of a day align to UTC midnight, as the reference's buckets do.
    t_env.get_config().set("table.local-time-zone", "UTC")
    if tiles:  # the tile queries' table settings (streaming/tiles.py)
        for key, value in TABLE_CONFIG.items():
            t_env.get_config().set(key, value)
    for compiled in views:
        table = f"source_{compiled.name}"
        offsets = None if stop_offsets is None else stop_offsets[compiled.topic]
        properties = {"fetch.max.wait.ms": str(options.fetch_max_wait_ms)}
        t_env.execute_sql(
            source_table_sql(
                compiled,
                table,
                settings.kafka_bootstrap,
                properties | settings.kafka_config,
                offsets,
                # Bounded runs end at given offsets: a partition waiting for its last records
                # must hold the watermark, or they would be late.
                idle_timeout_ms=0 if bounded else int(options.idle_timeout_s * 1000),
                rowtime=rowtime_column(compiled) if uses_tiles(compiled, options) else None,
            )
        )
        if uses_tiles(compiled, options):
            _tile_pipeline(t_env, compiled, table, ctx, java=options.engine == "tiles-java")
            continue
        prepare, windows = flink_functions(compiled, ctx)
        records = t_env.to_data_stream(t_env.sql_query(source_query(table)))
        # uids keep state assignable to operators across restarts from a checkpoint.
        events = (
            python_operators.process(records, prepare, Types.PICKLED_BYTE_ARRAY())
            .name(f"prepare {compiled.name}")
            .uid(f"prepare-{compiled.name}")
        )
        (
            python_operators.process(events.key_by(_entity_of, key_type=Types.STRING()), windows)
            .name(f"windows {compiled.name}")
            .uid(f"windows-{compiled.name}")
        )
    return env


def _tile_pipeline(
    t_env: Any, compiled: CompiledView, table: str, ctx: JobContext, *, java: bool
) -> None:
    """Source -> SQL (decode, filter, late check, tiles; streaming/tiles.py) -> Tiles; with
    ``java``, window assembly in the JVM between the two (streaming/java_windows.py)."""

    from streaming.tile_functions import tile_function

    views, query = tile_query(compiled, table)
    for statement in views:
        t_env.execute_sql(statement)
    keyed = _keyed_by_shard(t_env, t_env.sql_query(keyed_by_shard(compiled, query)))
    if java:
        from streaming.java_windows import java_windows

        keyed = java_windows(keyed, compiled, ctx.settings)
    (
        python_operators.process(keyed, tile_function(compiled, ctx, java_windows=java))
        .name(f"tiles {compiled.name}")
        .uid(f"tiles-{compiled.name}")
    )


def _keyed_by_shard(t_env: Any, table: Any) -> Any:
    """A KeyedStream of a table of (shard INT, row ROW<...>) rows, keyed by the shard.

    PyFlink's key_by runs a Python map that builds Row(key, value) for a Java keyBy on the
    first field: every row would cross into Python and back once more before the keyed
    function. The SQL hands over that shape itself (tiles.keyed_by_shard), so the Java keyBy
    follows it directly: key_by's own construction (pyflink/datastream/data_stream.py) minus
    its map. PyFlink's keyed operator takes a RowTypeInfo input only, so the stream's type is
    the table's row type in that form (to_data_stream gives an ExternalTypeInfo; the records
    are the same Row objects).
    """
    from pyflink.java_gateway import get_gateway

    gateway = get_gateway()
    data_type = table._j_table.getResolvedSchema().toPhysicalRowDataType()
    conversions = gateway.jvm.org.apache.flink.table.types.utils.TypeConversions
    rows = t_env.to_data_stream(table)
    rows._j_data_stream.getTransformation().setOutputType(
        conversions.fromDataTypeToLegacyInfo(data_type)
    )
    return key_by_shard(rows)


def key_by_shard(rows: Any) -> Any:
    """A DataStream of (shard INT, row ROW<...>) rows, of a RowTypeInfo, keyed by the shard in
    Java (_keyed_by_shard)."""
    from pyflink.common import Types
    from pyflink.datastream.data_stream import KeyedStream
    from pyflink.java_gateway import get_gateway

    selector = get_gateway().jvm.KeyByKeySelector()
    keyed = rows._j_data_stream.keyBy(selector, Types.ROW([Types.INT()]).get_java_type_info())
    # The original element type: only KeyedStream's reduce, filter and windows read it, not
    # process (the Python operator takes its input type from the Java stream).
    return KeyedStream(keyed, None, rows)


def _entity_of(event: tuple[str, int, Any]) -> str:
    return event[0]


def _flink_python_jar() -> Path:
    spec = importlib.util.find_spec("pyflink")
    if spec is None or not spec.submodule_search_locations:
        raise StreamJobError("apache-flink is not installed")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("opt/flink-python-*.jar"))
    if not found:
        raise StreamJobError("pyflink/opt/flink-python-*.jar is missing: reinstall apache-flink")
    return found[-1]
