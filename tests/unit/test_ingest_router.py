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
