"""bench.stream's live density: the events' times compressed by one factor, order kept."""

from __future__ import annotations

import itertools

from bench.stream_events import START_MS, _validated, compress_time, simulated
from examples.delivery.sources import COURIER_PINGS, ORDERS
from features.schema import FieldType

N = 2_000


def test_compress_time_spans_n_over_density_seconds_and_keeps_the_order() -> None:
    events = list(_validated(N))
    sources = [source for source, _ in simulated(N)]
    source_of = {ORDERS.name: ORDERS, COURIER_PINGS.name: COURIER_PINGS}
    compress = compress_time(N, density=400.0)  # 2,000 events over 5 s of event time
    moved = [compress(s, e) for s, e in zip(sources, events, strict=True)]
    times = [e.event_time_ms for e in moved]
    assert max(times) - START_MS == 5_000
    assert min(times) >= START_MS
    before = sorted(range(N), key=lambda i: (events[i].event_time_ms, i))
    # Rounding may tie two events that were apart, never swap them.
    assert all(times[a] <= times[b] for a, b in itertools.pairwise(before))
    for source, old, new in zip(sources, events, moved, strict=True):
        fields = source_of[source].fields
        for field in (f.name for f in fields if f.type is FieldType.TIMESTAMP):
            if isinstance(old.values.get(field), int):
                assert new.values[field] <= old.values[field]  # towards START_MS
        untouched = {f.name for f in fields if f.type is not FieldType.TIMESTAMP}
        assert {k: new.values.get(k) for k in untouched} == {
            k: old.values.get(k) for k in untouched
        }


def test_a_density_below_the_events_own_leaves_them_as_they_are() -> None:
    events = list(_validated(200))
    sources = [source for source, _ in simulated(200)]
    compress = compress_time(200, density=1e-6)
    assert [compress(s, e) for s, e in zip(sources, events, strict=True)] == events
