"""Shared by the stream restart tests (a savepoint, a killed TaskManager) and the cluster
module: an isolated courier-pings view on its own topics, its producer, the rows the job
emitted and the reference rows they must equal; the settings of a `up --cluster` stack on
free ports with every shared location in its object store; and the delivery sources on topics
of one test, for `sluice ingest` and `sluice archive` subprocesses."""

from __future__ import annotations

import importlib
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from core.kafka import ensure_topics
from core.records import FeatureRow
from core.settings import Settings
from events.history import SourceEvent
from examples.delivery.features import zone_couriers
from examples.delivery.simulate import DeliverySimulator
from examples.delivery.sources import SOURCES
from features.definitions import FeatureView
from features.reference import compute_view, with_closing_rows
from features.schema import EventSource
from infra.stack import free_port
from streaming.compile import features_topic
from tests.helpers.stream import (
    PARTITIONS,
    START,
    Topic,
    closing_end,
    hand_made,
    patient_store,
    read_all,
)

Rows = dict[tuple[str, int], Any]


def row_is_online(settings: Settings, view: FeatureView, entity: str, end: int) -> bool:
    """Whether the online store holds the entity's row of the window ending at ``end``."""
    with patient_store(settings) as store:
        row = store.read(view, [entity])[0]
    return row is not None and row.window_end_ms >= end


@dataclass
class CourierStream:
    """zone_couriers on topics of its own (``<tag>.events.courier_pings``, its own dead-letter
    topic and Feast project), fed simulated pings in time order."""

    settings: Settings
    source: EventSource
    view: FeatureView
    topic: Topic
    lateness_ms: int
    pings: Iterator[SourceEvent] = field(repr=False)

    @classmethod
    def create(cls, base: Settings, prefix: str, seed: int, **update: Any) -> CourierStream:
        tag = f"{prefix}{uuid.uuid4().hex[:8]}"
        settings = base.model_copy(
            update={"dead_letter_topic": f"{tag}.dead-letter", "feast_project": tag, **update}
        )
        source = zone_couriers.source.model_copy(update={"topic": f"{tag}.events.courier_pings"})
        view = zone_couriers.model_copy(update={"name": f"zone_couriers_{tag}", "source": source})
        ensure_topics(settings, [source.topic], partitions=PARTITIONS)
        pings = (
            e
            for e in DeliverySimulator(seed=seed, start_ms=START).events()
            if e.source == source.name
        )
        lateness = int(source.allowed_lateness.total_seconds() * 1000)
        return cls(settings, source, view, Topic(settings, source), lateness, pings)

    def produce_until(self, t_end: int) -> int:
        """Pings up to (and including the first at or after) ``t_end``; the newest event time."""
        newest = START
        for event in self.pings:
            values = self.topic.canonical(event.payload).values
            self.topic.produce(values)
            newest = values[self.source.event_time_field]
            if newest >= t_end:
                break
        self.topic.flush()
        return newest

    def close_windows(self, newest: int) -> tuple[int, int]:
        """A probe whose row closes last and a sentinel per partition that moves every
        partition's watermark past it: (final window end, the probe's event time)."""
        end = closing_end(self.view, newest)
        probe = end - self.view.max_window.size_ms - self.view.slide_ms
        self.topic.produce(hand_made(self.source, probe, "z-final"))
        for p in range(PARTITIONS):
            self.topic.produce(hand_made(self.source, end + self.lateness_ms, f"z-end-{p}"), p)
        self.topic.flush()
        return end, probe

    def emitted(self) -> Rows:
        """Every row on the view's features topic; a row emitted twice (replayed after a
        restore) must carry the same values."""
        got: Rows = {}
        for msg in read_all(self.settings, features_topic(self.view.name)):
            row = FeatureRow.decode(msg.value())
            key = (row.entity_key, row.window_end_ms)
            assert key not in got or got[key] == row.values, key
            got[key] = row.values
        return got

    def reference(self, until_end: int) -> Rows:
        """The pure-Python reference's rows of everything produced, up to ``until_end``."""
        rows = with_closing_rows(self.view, compute_view(self.view, self.topic.events))
        return {k: v for k, v in rows.items() if k[1] <= until_end}


def cluster_ports(base: Settings, state_dir: Path) -> Settings:
    """The session's settings for a `up --cluster` stack of its own: free ports, own state."""
    return base.model_copy(
        update={
            "state_dir": state_dir,
            "cluster_flink_rest_port": free_port(),
            "cluster_spark_master_port": free_port(),
            "cluster_spark_ui_port": free_port(),
            "cluster_spark_worker_ui_port": free_port(),
            "cluster_object_store_port": free_port(),
        }
    )


def with_storage(settings: Settings, **update: Any) -> Settings:
    """``settings`` with ``update`` validated as a config file's values are, so that
    ``history_dir: s3://...`` resolves under ``s3_mount_dir`` (model_copy would not)."""
    return Settings.model_validate(settings.model_dump() | update)


def tagged_sources(directory: Path, tag: str) -> ModuleType:
    """Write and import the definitions module ``sources_<tag>``: the delivery sources on raw
    and events topics of their own (``<tag>.raw.<source>``, ``<tag>.events.<source>``), so
    that `sluice ingest` and `sluice archive` subprocesses see only the test's records. Its
    directory joins sys.path (tests/helpers/pipeline.sluice_env puts it on theirs)."""
    name = f"sources_{tag}"
    lines = [
        f"{source.name} = examples.SOURCES[{i}].model_copy(\n"
        f'    update={{"topic": "{tag}.events.{source.name}", '
        f'"raw_topic": "{tag}.raw.{source.name}"}}\n'
        ")"
        for i, source in enumerate(SOURCES)
    ]
    (directory / f"{name}.py").write_text(
        f'"""Written by tests/helpers/cluster_stack.py: the delivery sources of test {tag}."""\n'
        "from examples.delivery import sources as examples\n\n" + "\n".join(lines) + "\n"
    )
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    return importlib.import_module(name)
