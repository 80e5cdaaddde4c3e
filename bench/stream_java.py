"""A measurement spike: the tile SQL, keyed by shard, into window assembly in the JVM
(bench/java/sluice/TileWindowsSpike.java: one aggregation, the unique events per window) and
Flink's Kafka sink, no Python operator and no Redis. What moving window assembly into Java
would buy, against `tiles` (Python assembles) and `tiles-sql` (no assembly at all)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from bench.stream_jobs import _source_tables, tile_environment
from core.kafka import ensure_topics
from core.settings import Settings
from streaming.job import JobOptions, _keyed_by_shard

JAVA_DIR = Path(__file__).resolve().parent / "java"
TOPIC = "bench.java-windows"


def spike_jar(state_dir: Path) -> Path:
    sources = sorted(JAVA_DIR.rglob("*.java"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    jar = state_dir / "flink" / "udf" / f"sluice-spike-{digest}.jar"
    if jar.exists():
        return jar
    import pyflink

    lib = Path(pyflink.__file__).resolve().parent / "lib"
    jar.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as build:
        javac = shutil.which("javac") or "javac"
        command = [javac, "-nowarn", "-d", build, "-cp", f"{lib}/*", *map(str, sources)]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
        with zipfile.ZipFile(jar, "w") as archive:
            for path in sorted(Path(build).rglob("*.class")):
                archive.write(path, path.relative_to(build).as_posix())
    return jar


def tiles_java(settings: Settings, stop: dict[str, dict[int, int]], options: JobOptions) -> float:
    """Wall seconds of the spike job over the bench's events (bounded at ``stop``)."""
    from pyflink.common import Types
    from pyflink.common.serialization import SimpleStringSchema
    from pyflink.datastream import DataStream
    from pyflink.datastream.connectors.kafka import KafkaRecordSerializationSchema, KafkaSink
    from pyflink.java_gateway import get_gateway

    from streaming.tiles import keyed_by_shard, tile_query

    started = time.monotonic()
    ensure_topics(settings, [TOPIC])
    jar = spike_jar(settings.state_dir)
    env, t_env = tile_environment(settings, "bench-tiles-java", options, (jar,))
    loader = get_gateway().jvm.Thread.currentThread().getContextClassLoader()
    spike_class = loader.loadClass("sluice.TileWindowsSpike")
    sink = (
        KafkaSink.builder()
        .set_bootstrap_servers(settings.kafka_bootstrap)
        .set_record_serializer(
            KafkaRecordSerializationSchema.builder()
            .set_topic(TOPIC)
            .set_value_serialization_schema(SimpleStringSchema())
            .build()
        )
        .build()
    )
    for compiled, table in _source_tables(t_env, settings, stop, "tiles_java"):
        views, query = tile_query(compiled, table)
        for statement in views:
            t_env.execute_sql(statement)
        keyed = _keyed_by_shard(t_env, t_env.sql_query(keyed_by_shard(compiled, query)))
        function = _new_spike(spike_class, compiled.name, compiled.max_window_ms, compiled.slide_ms)
        rows = keyed._j_data_stream.process(function, Types.STRING().get_java_type_info())
        DataStream(rows).sink_to(sink)
    env.execute("bench-tiles-java")
    seconds = time.monotonic() - started
    print(f"  tiles-java: {count_records(settings, TOPIC):,} rows in {TOPIC} so far")
    return seconds


def _new_spike(spike_class: Any, view: str, size_ms: int, slide_ms: int) -> Any:
    """new TileWindowsSpike(view, size, slide) through reflection: the class is in a jar of
    pipeline.jars, which the job's class loader sees and py4j's ``gateway.jvm`` does not."""
    from pyflink.java_gateway import get_gateway

    lang = get_gateway().jvm.java.lang
    types = get_gateway().new_array(lang.Class, 3)
    types[0], types[1], types[2] = lang.String._java_lang_class, lang.Long.TYPE, lang.Long.TYPE
    values = get_gateway().new_array(lang.Object, 3)
    values[0], values[1], values[2] = view, lang.Long(size_ms), lang.Long(slide_ms)
    return spike_class.getConstructor(types).newInstance(values)


def count_records(settings: Settings, topic: str) -> int:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        settings.kafka_client_config(
            **{"group.id": f"count-{time.time_ns()}", "auto.offset.reset": "earliest"}
        )
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    count, last = 0, time.monotonic()
    while time.monotonic() - last < 5:
        batch = consumer.consume(10_000, 0.5)
        count += sum(1 for m in batch if m.error() is None)
        if batch:
            last = time.monotonic()
    consumer.close()
    return count
