"""The tile engine's counts: events counted when read, processed when their tile closes, open
in between (core/stream_stats.WindowCounts.open, streaming/monitor.ViewReport.balanced)."""

from __future__ import annotations

import orjson

from core.stream_stats import StreamStats, WindowCounts
from streaming.monitor import ViewReport


def test_a_run_balances_with_its_open_events_and_not_without():
    # Run 1 read 100: 60 aggregated, 5 late, 35 in tiles still open at its stop.
    run1 = ViewReport(events=100, aggregated=60, late=5, open=35)
    # Run 2 read 50 and closed run 1's 35 open ones too, leaving 4 open: open = 4 - 35.
    run2 = ViewReport(events=50, aggregated=80, filtered=1, open=4 - 35)
    assert run1.balanced()
    assert run2.balanced()
    assert run1.open + run2.open == 4  # what the last stop left open
    assert not ViewReport(events=100, aggregated=60, late=5, open=34).balanced()
    assert not ViewReport(events=100, aggregated=60, late=5).balanced()


def test_open_round_trips_and_older_records_without_it_read_as_zero():
    record = StreamStats("run1", "v", 0, WindowCounts(aggregated=9, open=-3), True, 1)
    assert StreamStats.decode(record.encode()) == record
    older = orjson.loads(record.encode())
    del older["open"]
    decoded = StreamStats.decode(orjson.dumps(older))
    assert decoded.counts == WindowCounts(aggregated=9, open=0)
