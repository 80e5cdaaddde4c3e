"""A 30-day window on 1-minute slides (43,200 tiles per key) under the tile engine, against the
reference: a few events spread over 40 days, so that tiles leave the window (one key's events
long gone while it still has newer ones), with a duplicate and a second, shorter window beside
it (merged tile by tile, while the 30-day one goes through streaming/windows.WindowQueue), and
keys read back from Flink's MapState (the tile engine's cache of decoded keys shrunk to one).
Every row of both keys, closing rows included: about 140,000."""

from __future__ import annotations

import itertools
import random
import uuid
from pathlib import Path
from typing import Any

import pytest

from core.kafka import ensure_topics
from core.records import FeatureRow
from core.settings import Settings
from examples.delivery.features import restaurant_orders
from examples.delivery.sources import ORDERS
from features.definitions import Aggregation, AggregationFunction, Window
from features.reference import compute_view, with_closing_rows
from streaming import tile_state
from streaming.compile import compile_view, features_topic
from streaming.job import JobOptions
from streaming.runner import run as run_stream
from tests.helpers.stream import START, Topic, hand_made, read_all, row_differences

pytestmark = [pytest.mark.integration, pytest.mark.flink]

DAY = 86_400_000
F = AggregationFunction


def test_thirty_day_window_on_minute_slides_under_tiles_equals_the_reference(
    stack_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # A cache of one shard's tiles: the two keys' shards push each other out, so each is read
    # back from Flink's MapState again and again (a local job's Python runs in this process).
    monkeypatch.setattr(tile_state, "DEFAULT_CAPACITY_TILES", 1)
    assert tile_state.shard_of("r-a") != tile_state.shard_of("r-b")
    tag = f"m{uuid.uuid4().hex[:8]}"
    settings = stack_settings.model_copy(
        update={
            "dead_letter_topic": f"{tag}.dead-letter",
            "state_dir": tmp_path,
            "feast_project": tag,
        }
    )
    source = ORDERS.model_copy(update={"topic": f"{tag}.events.orders"})
    month, hour = Window.sliding("30d", "1m"), Window.sliding("1h", "1m")
    functions = (
        (F.COUNT, None, (month, hour)),
        (F.SUM, "items", (month,)),
        (F.MEAN, "subtotal", (month,)),
        (F.MAX, "distance_km", (month, hour)),
        (F.LAST, "items", (month,)),
        (F.STDDEV, "subtotal", (month,)),
        (F.COUNT_DISTINCT, "zone_id", (month,)),
    )
    view = restaurant_orders.model_copy(
        update={
            "name": f"month_{tag}",
            "source": source,
            "aggregations": tuple(
                Aggregation(function=f, column=c, windows=w) for f, c, w in functions
            ),
        }
    )
    compiled = compile_view(view)
    assert compiled.max_window_ms // compiled.slide_ms == 43_200
    ensure_topics(settings, [source.topic], partitions=1)
    topic = Topic(settings, source)

    rng = random.Random(30)
    first = START - 45 * DAY
    times = sorted(
        [("r-a", first + rng.randrange(40 * DAY)) for _ in range(12)]
        + [("r-a", first + DAY + 7 * 60_000 + k) for k in range(2)]  # one tile, two events
        + [("r-b", first + rng.randrange(2 * DAY)) for _ in range(3)],
        key=lambda pair: pair[1],
    )
    for i, (entity, t) in enumerate(times):
        event = hand_made(source, t, entity) | {
            "items": rng.randint(1, 9),
            "subtotal": round(rng.uniform(5, 80), 2),
            "distance_km": round(rng.uniform(0, 9), 1),
            "zone_id": rng.choice(["z01", "z02", "z04"]),
        }
        topic.produce(event, 0)
        if i == 5:
            topic.produce(event, 0)  # delivered twice: counts once
    topic.flush()
    stop = {source.topic: {0: topic.next_offset[0]}}

    report = run_stream(
        settings, [view], stop_at_offsets=stop, options=JobOptions(engine="tiles"), echo=print
    )

    want = with_closing_rows(view, compute_view(view, topic.unique_events()))
    got: dict[tuple[str, int], dict[str, Any]] = {}
    for msg in read_all(settings, features_topic(view.name)):
        row = FeatureRow.decode(msg.value())
        got[(row.entity_key, row.window_end_ms)] = row.values
    assert len(want) > 100_000
    assert row_differences(got, want) == []
    # Tiles left the window: r-a's 30-day count went down while it still had events ahead.
    counts = [v["count_30d"] for (entity, _), v in sorted(want.items()) if entity == "r-a"]
    assert any(a > b > 0 for a, b in itertools.pairwise(counts))
    stats = report.views[view.name]
    assert stats.events == len(topic.events)
    assert stats.duplicates == 1
    assert stats.rows == len(want)
    assert stats.balanced(), stats
