"""Window assembly in the JVM (streaming/java/sluice/WindowAssembler.java): the view's plan.

The Java window code reads a view as JSON: its slide, its window sizes in the order of the
view's windows, one slot per partial state (the aggregation and the type of the column it reads:
the tile row's state columns, streaming/tiles.py), and one spec per feature (its name, slot and
window size), as streaming/compile.CompiledView holds them.
"""

from __future__ import annotations

from typing import Any

import orjson

from core.settings import Settings
from streaming.compile import CompiledView, features_topic

# The engines that run the tile query (streaming/tiles.py): "tiles" assembles windows in Python
# (streaming/tile_functions.py), "tiles-java" in the JVM (below).
TILE_ENGINES = ("tiles", "tiles-java")


def window_plan(compiled: CompiledView) -> str:
    """The view's plan as WindowAssembler reads it."""
    types = compiled.view.column_types()
    slots = [
        {
            "function": str(function),
            "type": None if index is None else str(types[compiled.columns[index]]),
        }
        for index, function in compiled.slots
    ]
    specs = [{"name": s.name, "slot": s.slot, "window": s.window_ms} for s in compiled.specs]
    plan = {
        "view": compiled.name,
        "slide": compiled.slide_ms,
        "sizes": list(compiled.window_sizes_ms),
        "slots": slots,
        "specs": specs,
    }
    return orjson.dumps(plan).decode()


def java_windows(keyed: Any, compiled: CompiledView, settings: Settings) -> Any:
    """The shard-keyed tile rows through sluice.TileWindows (window assembly in the JVM): its
    feature rows to the view's features topic by Flink's Kafka sink, at least once (flushed at
    every checkpoint); its other rows, keyed by shard again, for the Python tile function."""
    from pyflink.datastream import DataStream
    from pyflink.java_gateway import get_gateway

    from streaming.job import key_by_shard
    from streaming.udf import construct, jar_loader

    gateway = get_gateway()
    jvm = gateway.jvm
    loader = jar_loader()
    j_keyed = keyed._j_data_stream
    row_type = j_keyed.getType()
    arity = row_type.getTypeAt(1).getArity()
    windows_class = loader.loadClass("sluice.TileWindows")
    text = jvm.java.lang.String._java_lang_class
    function = construct(
        windows_class, (text, window_plan(compiled)), (jvm.java.lang.Integer.TYPE, arity)
    )
    windows = (
        j_keyed.process(function, row_type)
        .name(f"windows {compiled.name}")
        .uid(f"windows-java-{compiled.name}")
    )
    tag = windows_class.getField("FEATURE_ROWS").get(None)
    records = construct(
        loader.loadClass("sluice.FeatureRowRecords"),
        (text, features_topic(compiled.name)),
    )
    kafka = jvm.org.apache.flink.connector.kafka.sink
    properties = jvm.java.util.Properties()
    for key, value in settings.kafka_config.items():
        properties.setProperty(key, str(value))
    sink = (
        kafka.KafkaSink.builder()
        .setBootstrapServers(settings.kafka_bootstrap)
        .setRecordSerializer(records)
        .setDeliveryGuarantee(jvm.org.apache.flink.connector.base.DeliveryGuarantee.AT_LEAST_ONCE)
        .setKafkaProducerConfig(properties)
        .build()
    )
    windows.getSideOutput(tag).sinkTo(sink).name(f"features {compiled.name}").uid(
        f"features-{compiled.name}"
    )
    return key_by_shard(DataStream(windows))
