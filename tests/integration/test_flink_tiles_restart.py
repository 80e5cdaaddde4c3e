"""The tile engine with windows in Python (stream_engine=tiles) stopped and resumed from its
savepoint: offsets, open tiles (in the SQL window state) and open windows (in Python) carry over.

The scenario of test_flink_restart.py (tests/helpers/stream.run_restart_scenario), on the tile
engine, plus its own count: events are counted when read, and processed when their tile closes;
in between they are ``open``. Run 1 leaves tiles open at its stop (in the savepoint), run 2
closes them and leaves open exactly the sentinels' tiles, past the final watermark: over both
runs, every event is read once and the open ones are the sentinels.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings
from tests.helpers.stream import PARTITIONS, check_carried_counts, run_restart_scenario

pytestmark = [pytest.mark.integration, pytest.mark.flink, pytest.mark.slow]


def test_tile_engine_restart_resumes_offsets_open_tiles_and_windows(
    stack_settings: Settings, tmp_path: Path
):
    # The default engine, tiles-java, runs this scenario in test_flink_restart.py.
    run = run_restart_scenario(stack_settings, tmp_path, "tiles")
    stopped_at, resumed = run.stopped_at, run.resumed
    time_field = run.topic.source.event_time_field
    sentinels = [e for e in run.topic.events if e[time_field] >= run.final_w]
    assert len(sentinels) == PARTITIONS
    assert stopped_at.events + resumed.events == len(run.topic.events), "every event read once"
    assert stopped_at.balanced()
    assert resumed.balanced()
    # Counted when read, whatever their tile: what is still open is what is past the end.
    assert stopped_at.open + resumed.open == len(sentinels)
    check_carried_counts(run)
