"""Flink streaming engine: sliding windows over Kafka into the online store.

``streaming.runner.run(settings, views, ...)`` compiles feature views (those whose ``engines``
include "flink") to one PyFlink job and runs it. PyFlink itself loads only when a job is built.

Lateness, precisely: the watermark of a view is the minimum over its source's partitions of
(greatest Kafka record timestamp read from that partition) - source.allowed_lateness, emitted
every JobOptions.watermark_interval_ms. An event that passes the view's filter is too late
when, as it arrives, the watermark has reached the end of its slide bucket,
floor(t / slide) * slide + slide: the end of the smallest window holding it, whose row was
already emitted. Too-late events go to the dead-letter topic with reason "late" (headers as
ingest writes them, plus sluice.view); every other event counts in every window that holds
it. So an event at most allowed_lateness behind the newest earlier event of its own
partition always counts. Lateness is per view (views differ in slide), so a late event is
dead-lettered once per view it is late for.

On time (features/contract.py): a window ending at E is servable at E + view.lateness. Ingest
writes heartbeats (core.records.is_heartbeat) to partitions that went quiet, stamped with the
wall clock, so the watermark moves on when keys, partitions or the whole topic go quiet; the
job drops them right after the source (counted as heartbeats, not as events read). Optional
Flink idleness for partitions nothing writes: JobOptions.idle_timeout_s (streaming/job.py).

Engines (settings.stream_engine, JobOptions.engine): "tiles" decodes, filters,
checks lateness and builds each (entity, slide bucket)'s partial states in Flink SQL
(streaming/tiles.py, with Java functions in streaming/java/) and hands Python one row per tile
(streaming/tile_functions.py), which assembles windows with the same window code and writes
with the same sinks; "tiles-java" runs the same SQL and assembles the windows in the JVM
(streaming/java_windows.py, sluice.TileWindows: the Python window code ported and held equal to
it), writing the features topic with Flink's Kafka sink, and hands Python only the newest row of
each entity per firing, for the online store, and the rows it counts (the default since
2026-12-06, when the whole suite passed under it); "events" hands every event
to Python (streaming/functions.py), and runs the views the tile engines cannot run exactly
(tiles.tile_support) under any setting. All follow
the definitions below; the tile engine's late check is end <= W + 1 (Flink's window operators
fire a window at W >= end - 1), one millisecond stricter.

Duplicates: ingest is at least once, so an event may be read twice (the same canonical bytes,
events/identity.py). The window operator counts each event id once per key and tile and drops
repeats (counted as duplicates); ids leave with their tile's close (streaming/windows.py).
Every event read is aggregated, filtered, dead-lettered (late or rejected) or a duplicate.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from features.definitions import FeatureView

__all__ = ["stream_views"]


def stream_views(views: Iterable[FeatureView]) -> list[FeatureView]:
    """The views the stream engine runs (batch-only views are Spark's)."""
    return [v for v in views if "flink" in v.engines]
