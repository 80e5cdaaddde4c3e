"""A stopped stream job resumes from its savepoint: offsets and open windows carry over.

Run 1 reads simulated courier pings and is stopped (with a savepoint) as soon as a probe's
closing row is readable online, while later windows are still open in its state. More events
follow; run 2 restores the savepoint, reads only what run 1 had not, and finishes the windows
that were open. Together the two runs emit exactly the reference rows up to the final
watermark, and every event is read once (tests/helpers/stream.run_restart_scenario). Runs on
the engine the settings name (SLUICE_STREAM_ENGINE); test_flink_tiles_restart.py runs the tile
engine whatever they name.

Statistics: the tile engine's counters are job state, so run 2 continues from run 1's
(tests/helpers/stream.check_carried_counts). The event engine's counters are not state: each
run counts from zero and its records say nothing was restored.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings
from streaming.java_windows import TILE_ENGINES
from tests.helpers.stream import check_carried_counts, run_restart_scenario

pytestmark = [pytest.mark.integration, pytest.mark.flink, pytest.mark.slow]


def test_restart_resumes_offsets_and_open_windows(stack_settings: Settings, tmp_path: Path):
    run = run_restart_scenario(stack_settings, tmp_path, stack_settings.stream_engine)
    stopped_at, resumed = run.stopped_at, run.resumed
    assert stopped_at.events + resumed.events == len(run.topic.events), "every event read once"
    assert stopped_at.balanced()
    assert resumed.balanced()
    if stack_settings.stream_engine in TILE_ENGINES:
        check_carried_counts(run)
    else:  # the event engine's counters restart from zero (streaming/monitor.py)
        assert stopped_at.restored is None
        assert resumed.restored is None
