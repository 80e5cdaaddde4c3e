"""Ingest routing without a broker: where each record goes, its headers, and the counts."""

from __future__ import annotations

import orjson

from events.ingest import H_FIELD, H_OFFSET, H_REASON, H_SOURCE, IngestRouter
from examples.delivery.sources import COURIER_PINGS, ORDERS, SOURCES

NOW_MS = 1_795_428_000_000
ORDER = {
    "order_id": "o-1",
    "restaurant_id": "r-7",
    "zone_id": "z-2",
    "items": 3,
    "subtotal": 25.0,
    "distance_km": 2.5,
    "placed_at": NOW_MS - 1000,
}
PING = {
    "courier_id": "c-1",
    "zone_id": "z-2",
    "speed_kmh": 18.5,
    "lat": 52.5,
    "lon": 13.4,
    "pinged_at": "2026-11-23T09:59:00Z",
}


def test_valid_record_is_keyed_and_timestamped():
    router = IngestRouter(SOURCES, "dlq")
    out = router.route(ORDERS.raw_topic, orjson.dumps(ORDER), b"whatever", 0, 11, NOW_MS)
    assert out.topic == ORDERS.topic
    assert out.key == b"r-7"
    assert out.timestamp_ms == NOW_MS - 1000
    assert orjson.loads(out.value)["restaurant_id"] == "r-7"
    assert out.headers is None


def test_invalid_record_keeps_original_bytes_and_says_why():
    router = IngestRouter(SOURCES, "dlq")
    raw = orjson.dumps(PING | {"speed_kmh": "fast"})
    out = router.route(COURIER_PINGS.raw_topic, raw, b"c-1", 3, 42, NOW_MS)
    assert out.topic == "dlq"
    assert out.value == raw
    assert out.key == b"c-1"
    headers = dict(out.headers or [])
    assert headers[H_REASON] == b"wrong_type"
    assert headers[H_FIELD] == b"speed_kmh"
    assert headers[H_SOURCE] == b"courier_pings"
    assert headers[H_OFFSET] == b"42"


def test_counts_balance_over_a_mix():
    router = IngestRouter(SOURCES, "dlq")
    records = [
        (ORDERS.raw_topic, orjson.dumps(ORDER)),
        (ORDERS.raw_topic, b"{not json"),
        (ORDERS.raw_topic, None),
        (ORDERS.raw_topic, orjson.dumps({k: v for k, v in ORDER.items() if k != "items"})),
        (COURIER_PINGS.raw_topic, orjson.dumps(PING)),
        (COURIER_PINGS.raw_topic, orjson.dumps(PING | {"pinged_at": "1970-01-02T00:00:00Z"})),
        (COURIER_PINGS.raw_topic, orjson.dumps(PING | {"lat": 91.0})),
    ]
    outs = [
        router.route(topic, value, None, 0, i, NOW_MS) for i, (topic, value) in enumerate(records)
    ]
    counts = router.counts
    assert counts.received == len(records)
    assert counts.balanced()
    assert counts.valid == 2
    assert counts.dead_lettered == 5
    assert sum(1 for o in outs if o.topic == "dlq") == 5
    assert dict(counts.by_reason) == {"invalid_json": 2, "missing_field": 1, "out_of_range": 2}
    assert dict(counts.by_source) == {"orders": 4, "courier_pings": 3}


def test_heartbeats_follow_each_partitions_event_time_with_the_wall_clock():
    from events.ingest import HeartbeatClock

    now = [1000.0]
    clock = HeartbeatClock({"events.orders": 3, "events.pings": 1}, 1000, lambda: now[0])
    now[0] += 5000
    assert clock.due() == [], "nothing is due on a topic before its first event"
    clock.delivered("events.orders", 0, NOW_MS)
    clock.delivered("elsewhere", 0, NOW_MS)  # dead letters and other topics are not tracked
    now[0] += 400
    clock.delivered("events.orders", 1, NOW_MS - 300)
    now[0] += 700  # partition 0 quiet for 1.1 s, partition 1 for 0.7 s, partition 2 never written
    assert clock.due() == [("events.orders", 0, NOW_MS + 1100), ("events.orders", 2, NOW_MS + 1100)]
    now[0] += 300
    assert clock.due() == [("events.orders", 1, NOW_MS - 300 + 1000)]
    now[0] += 500
    assert clock.due() == [], "one heartbeat per interval and partition"
    now[0] += 200
    assert clock.due() == [("events.orders", 0, NOW_MS + 2100), ("events.orders", 2, NOW_MS + 2100)]
    clock.delivered("events.orders", 0, NOW_MS - 50_000)  # an older event: the clock holds
    now[0] += 1000
    due = clock.due()
    assert [d for d in due if d[1] == 0] == [], "stamps never go back: none at or before 2100"
    now[0] += 1200  # partition 0's clock: NOW_MS + 2200 now
    assert ("events.orders", 0, NOW_MS + 2200) in clock.due()


def test_heartbeats_can_be_disabled():
    from events.ingest import HeartbeatClock

    now = [0.0]
    clock = HeartbeatClock({"events.orders": 1}, 0, lambda: now[0])
    clock.delivered("events.orders", 0, NOW_MS)
    now[0] += 60_000
    assert clock.due() == []


def test_a_heartbeat_is_recognized_by_its_header_alone():
    from core.records import H_KIND, HEARTBEAT_HEADERS, is_heartbeat

    assert is_heartbeat(HEARTBEAT_HEADERS)
    assert is_heartbeat({H_KIND: "heartbeat"})
    assert is_heartbeat([("x", None), (H_KIND, b"heartbeat")])
    assert not is_heartbeat(None)
    assert not is_heartbeat([])
    assert not is_heartbeat([(H_KIND, b"event")])
    assert not is_heartbeat([(H_REASON, b"late")])


def test_heartbeat_stamps_never_pass_a_raw_partition_not_read_to_its_end():
    from events.ingest import NO_CAP, RawProgress

    progress = RawProgress()
    assert progress.cap() is None, "nothing assigned yet"
    progress.assigned([("raw.orders", 0), ("raw.orders", 1)])
    assert progress.cap() is None, "partition 1 may hold a backlog of any age"
    progress.record("raw.orders", 0, 5_000)
    progress.record("raw.orders", 0, 4_000)  # out of order: the newest counts
    progress.end("raw.orders", 0)
    assert progress.cap() is None, "partition 1 still gave nothing"
    progress.record("raw.orders", 1, 2_000)
    assert progress.cap() == 2_000, "its backlog goes on from 2,000"
    progress.record("raw.orders", 1, None)  # dead-lettered: no event time
    assert progress.cap() == 2_000
    progress.end("raw.orders", 1)
    assert progress.cap() == NO_CAP, "both read to their ends"
    progress.record("raw.orders", 0, 9_000)
    assert progress.cap() == 9_000, "a record: more may follow until the next end"
    progress.revoked()
    assert progress.cap() is None
    progress.assigned([])
    assert progress.cap() == NO_CAP, "no partitions: nothing to wait for"


def test_a_capped_heartbeat_is_not_written_until_its_stamp_moves_on():
    from events.ingest import HeartbeatClock

    now = [0.0]
    clock = HeartbeatClock({"events.orders": 2}, 1000, lambda: now[0])
    clock.delivered("events.orders", 0, 10_000)
    now[0] = 1500.0
    assert clock.due(cap=7_000) == [("events.orders", 0, 7_000), ("events.orders", 1, 7_000)]
    now[0] = 3000.0
    assert clock.due(cap=7_000) == [], "the same stamp again says nothing"
    assert clock.due(cap=8_000) == [("events.orders", 0, 8_000), ("events.orders", 1, 8_000)]
