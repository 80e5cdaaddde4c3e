"""The delivery simulator: determinism, schema validity, and the signal features rely on."""

from __future__ import annotations

import random
from collections import Counter, defaultdict, deque
from datetime import UTC, datetime
from itertools import islice

import numpy as np
import orjson
import pytest

from events.history import SourceEvent
from examples.delivery.simulate import (
    CityConfig,
    CorruptionKind,
    DeliverySimulator,
    corrupt,
    iso_utc_ms,
    realtime_intensity,
)
from examples.delivery.sources import COURIER_PINGS, DELIVERIES, ORDERS, SOURCES_BY_NAME
from features.validation import EventValidator, Rejection, ValidEvent

MIDNIGHT_MS = int(datetime(2026, 11, 23, tzinfo=UTC).timestamp() * 1000)
HOUR_MS = 3_600_000
LUNCH_SEED = 3
# A city small enough to simulate a whole day in well under a second.
SMALL_CITY = CityConfig(
    n_restaurants=60, n_couriers=10, peak_orders_per_minute=15, ping_interval_s=300
)


def take(sim: DeliverySimulator, count: int) -> list[SourceEvent]:
    return list(islice(sim.events(), count))


def until(sim: DeliverySimulator, end_ms: int) -> list[SourceEvent]:
    events: list[SourceEvent] = []
    for event in sim.events():
        if event.event_time_ms >= end_ms:
            return events
        events.append(event)
    raise AssertionError("unreachable: the stream is endless")


@pytest.fixture(scope="module")
def lunch_events() -> list[SourceEvent]:
    """Default city from 10:00: rush hour builds up, deliveries complete."""
    return take(DeliverySimulator(seed=LUNCH_SEED, start_ms=MIDNIGHT_MS + 10 * HOUR_MS), 40_000)


@pytest.fixture(scope="module")
def small_city_day() -> list[SourceEvent]:
    return until(
        DeliverySimulator(seed=11, start_ms=MIDNIGHT_MS, city=SMALL_CITY),
        MIDNIGHT_MS + 24 * HOUR_MS,
    )


def test_same_seed_same_events_and_other_seed_differs() -> None:
    first = take(DeliverySimulator(seed=5, start_ms=MIDNIGHT_MS), 3_000)
    again = take(DeliverySimulator(seed=5, start_ms=MIDNIGHT_MS), 3_000)
    other = take(DeliverySimulator(seed=6, start_ms=MIDNIGHT_MS), 3_000)
    assert first == again
    assert first != other


def test_each_call_to_events_restarts_the_stream() -> None:
    sim = DeliverySimulator(seed=5, start_ms=MIDNIGHT_MS)
    assert take(sim, 500) == take(sim, 500)


def test_every_event_is_valid_and_matches_its_envelope(lunch_events: list[SourceEvent]) -> None:
    validators = {name: EventValidator(source) for name, source in SOURCES_BY_NAME.items()}
    now_ms = lunch_events[-1].event_time_ms
    for event in lunch_events:
        source = SOURCES_BY_NAME[event.source]
        assert tuple(event.payload) == source.field_names
        result = validators[event.source].validate(event.to_json(), now_ms=now_ms)
        assert isinstance(result, ValidEvent), (event, result)
        assert result.key == event.key == event.payload[source.key_field]
        assert result.event_time_ms == event.event_time_ms
    assert set(Counter(e.source for e in lunch_events)) == {"orders", "courier_pings", "deliveries"}


def test_event_times_never_decrease(lunch_events: list[SourceEvent]) -> None:
    times = [e.event_time_ms for e in lunch_events]
    assert times == sorted(times)
    assert times[0] >= MIDNIGHT_MS + 10 * HOUR_MS


def test_deliveries_follow_their_orders(lunch_events: list[SourceEvent]) -> None:
    placed = {e.payload["order_id"]: e.payload for e in lunch_events if e.source == "orders"}
    deliveries = [e.payload for e in lunch_events if e.source == "deliveries"]
    assert deliveries
    for delivery in deliveries:
        order = placed[delivery["order_id"]]
        assert delivery["placed_at"] == order["placed_at"]
        assert (delivery["restaurant_id"], delivery["zone_id"]) == (
            order["restaurant_id"],
            order["zone_id"],
        )
        assert delivery["distance_km"] == order["distance_km"]
        took_ms = _ms(delivery["delivered_at"]) - _ms(delivery["placed_at"])
        assert took_ms == pytest.approx(delivery["delivery_seconds"] * 1000, abs=1)
        assert delivery["delivery_seconds"] > delivery["prep_seconds"]


def test_rush_hour_orders_outnumber_night_orders(small_city_day: list[SourceEvent]) -> None:
    def orders_between(start_hour: int, end_hour: int) -> int:
        lo, hi = MIDNIGHT_MS + start_hour * HOUR_MS, MIDNIGHT_MS + end_hour * HOUR_MS
        return sum(1 for e in small_city_day if e.source == "orders" and lo <= e.event_time_ms < hi)

    night, lunch, dinner = orders_between(3, 4), orders_between(12, 13), orders_between(19, 20)
    assert lunch > 3 * max(night, 1)
    assert dinner > 3 * max(night, 1)


def test_more_couriers_ping_at_rush_hour(small_city_day: list[SourceEvent]) -> None:
    def couriers_between(start_hour: int, end_hour: int) -> int:
        lo, hi = MIDNIGHT_MS + start_hour * HOUR_MS, MIDNIGHT_MS + end_hour * HOUR_MS
        pings = (e for e in small_city_day if e.source == "courier_pings")
        return len({e.key for e in pings if lo <= e.event_time_ms < hi})

    assert couriers_between(19, 20) > 2 * couriers_between(3, 4)


def test_prep_time_grows_with_restaurant_load(lunch_events: list[SourceEvent]) -> None:
    # Load as a streaming feature sees it: the restaurant's orders in the last 15 minutes.
    recent: dict[str, deque[int]] = defaultdict(deque)
    load_at_order: dict[str, int] = {}
    for event in lunch_events:
        if event.source != "orders":
            continue
        window = recent[event.key]
        while window and window[0] <= event.event_time_ms - 15 * 60_000:
            window.popleft()
        window.append(event.event_time_ms)
        load_at_order[event.payload["order_id"]] = len(window)
    by_restaurant: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for event in lunch_events:
        if event.source == "deliveries" and event.key in load_at_order:
            by_restaurant[event.payload["restaurant_id"]].append(
                (load_at_order[event.key], event.payload["prep_seconds"])
            )
    # Within each restaurant: across restaurants, base prep times (batch features) dominate and
    # which ones happen to be popular is a draw of the seed.
    load_deviation, prep_deviation = [], []
    for pairs in by_restaurant.values():
        loads, preps = np.array(pairs, dtype=float).T
        load_deviation.extend(loads - loads.mean())
        prep_deviation.extend(preps - preps.mean())
    assert len(load_deviation) > 1_000
    assert np.corrcoef(load_deviation, prep_deviation)[0, 1] > 0.2


def test_slow_zones_have_slower_pings(lunch_events: list[SourceEvent]) -> None:
    sim = DeliverySimulator(seed=LUNCH_SEED, start_ms=0)  # the layout depends on the seed only
    slow = {z.zone_id for z in sim.zones if z.slow}
    assert 0 < len(slow) < len(sim.zones)
    speeds: dict[bool, list[float]] = {True: [], False: []}
    for event in lunch_events:
        if event.source == "courier_pings":
            speeds[event.payload["zone_id"] in slow].append(event.payload["speed_kmh"])
    assert np.mean(speeds[True]) < 0.7 * np.mean(speeds[False])


def test_realtime_intensity_hits_the_target_rate() -> None:
    city = SMALL_CITY
    target = 0.2  # events per second of sim time, averaged over a day
    sim = DeliverySimulator(
        seed=2, start_ms=MIDNIGHT_MS, city=city, intensity=realtime_intensity(city, target)
    )
    events = until(sim, MIDNIGHT_MS + 24 * HOUR_MS)
    assert len(events) / 86_400 == pytest.approx(target, rel=0.15)
    assert realtime_intensity(city, 2 * target) == pytest.approx(
        2 * realtime_intensity(city, target)
    )


def test_intensity_scales_the_city() -> None:
    sim = DeliverySimulator(seed=1, start_ms=MIDNIGHT_MS, intensity=2.0)
    assert len(sim.restaurants) == 400
    assert len(sim.courier_ids) == 300
    with pytest.raises(ValueError, match="intensity"):
        DeliverySimulator(seed=1, start_ms=MIDNIGHT_MS, intensity=0)


def test_iso_timestamps_match_datetime() -> None:
    for ms in (0, 1, 999, 59_999, MIDNIGHT_MS - 1, MIDNIGHT_MS + 45_296_789, 4_102_444_800_000):
        expected = datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
        assert iso_utc_ms(ms) == expected


@pytest.mark.parametrize("kind", list(CorruptionKind))
@pytest.mark.parametrize("source", [ORDERS, COURIER_PINGS, DELIVERIES], ids=lambda s: s.name)
def test_corrupted_events_are_rejected_as_declared(kind, source, lunch_events) -> None:
    validator = EventValidator(source)
    good = [e.payload for e in lunch_events if e.source == source.name][:40]
    rng = random.Random(kind.value)
    now_ms = lunch_events[-1].event_time_ms
    for payload in good:
        raw, reason, field = corrupt(rng, source, payload, kind)
        result = validator.validate(raw, now_ms=now_ms)
        assert isinstance(result, Rejection), (raw, result)
        assert (result.reason, result.field) == (reason, field), (raw, result)
    assert isinstance(validator.validate(orjson.dumps(good[0]), now_ms=now_ms), ValidEvent)


def test_corrupt_without_kind_mixes_kinds(lunch_events: list[SourceEvent]) -> None:
    rng = random.Random(0)
    payload = next(e.payload for e in lunch_events if e.source == "orders")
    reasons = Counter(corrupt(rng, ORDERS, payload)[1] for _ in range(200))
    assert len(reasons) == 4  # invalid_json, missing_field, wrong_type, out_of_range


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)
