"""Flink streaming engine: sliding windows over Kafka into the online store.

``run(settings, views, ...)`` compiles feature views (those whose ``engines`` include "flink")
to one PyFlink job and runs it; see streaming/runner.py. Importing this package is cheap:
PyFlink and the job modules load when ``run`` is called.

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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from features.definitions import FeatureView
    from infra.settings import Settings
    from streaming.job import JobOptions
    from streaming.monitor import StreamReport

__all__ = ["run", "stream_views"]


def stream_views(views: Iterable[FeatureView]) -> list[FeatureView]:
    """The views the stream engine runs (batch-only views are Spark's)."""
    return [v for v in views if "flink" in v.engines]


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
    """Run the stream job of ``views``; see streaming.runner.run."""
    from streaming.runner import run as run_job

    return run_job(
        settings,
        views,
        bounded_until_ms=bounded_until_ms,
        stop_at_offsets=stop_at_offsets,
        options=options,
        restore=restore,
        report_every_s=report_every_s,
        echo=echo,
        should_stop=should_stop,
    )
