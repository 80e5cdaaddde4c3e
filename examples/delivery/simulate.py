"""Synthetic food-delivery traffic for the example domain (features/examples/delivery.py).

DeliverySimulator yields an endless, time-ordered stream of orders, courier pings and completed
deliveries for one city. The numbers carry signal that only fresh (streaming) features capture:

* orders follow a daily curve (lunch and dinner rushes, quiet nights) and Zipf-like restaurant
  popularity;
* a restaurant's prep time grows with the orders it received in the last 15 minutes, relative
  to the size of its kitchen;
* zones have their own speeds, a few are much slower, traffic slows everyone at rush hours and a
  per-zone drift (incidents, weather) moves speeds minute by minute; courier pings report it;
* delivery_seconds = prep + pickup overhead + distance / current zone speed + noise.

Everything is drawn from ``random.Random`` seeded from ``seed``, so a seed and a start time give
the same events on every run and platform. ``corrupt`` turns a good event into a bad one with a
known rejection, for dead-letter tests and demos.
"""

from __future__ import annotations

import itertools
import math
import random
import struct
from bisect import bisect
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from heapq import heappop, heappush, heapreplace
from typing import Any

import orjson

from events.history import SourceEvent
from examples.delivery.sources import COURIER_PINGS, DELIVERIES, ORDERS
from features.schema import EventSource, FieldType
from features.validation import RejectReason

MINUTE_MS = 60_000
MINUTES_PER_DAY = 1440
LOAD_WINDOW_MS = 15 * MINUTE_MS

# Shares and noise levels below are guesses at a mid-sized city, chosen so that each effect is
# visible in features yet none of them dominates the label.
IDLE_PING_SHARE = 0.2  # pings from couriers waiting at a restaurant or a door
ZONE_HOP_PER_PING = 0.01  # couriers repositioning on their own, besides being dispatched
ZONE_DRIFT_KEEP = 0.9  # per-minute persistence of a zone's incident/weather speed factor
ZONE_DRIFT_NOISE = 0.04
ZONE_CELL_LAT, ZONE_CELL_LON = 0.03, 0.045  # roughly 3.3 km square cells at 52 degrees north


@dataclass(frozen=True)
class CityConfig:
    """The shape of the simulated city at intensity 1."""

    n_restaurants: int = 200
    n_zones: int = 12
    n_slow_zones: int = 3
    n_couriers: int = 150
    peak_orders_per_minute: float = 60.0
    ping_interval_s: float = 30.0
    # Zipf exponent of restaurant popularity: 0.9 gives the top one of 200 ~13% of all orders.
    popularity_exponent: float = 0.9
    center_lat: float = 52.52
    center_lon: float = 13.405

    def __post_init__(self) -> None:
        if min(self.n_restaurants, self.n_zones, self.n_couriers) < 1:
            raise ValueError("a city needs at least one restaurant, zone and courier")
        if not 0 <= self.n_slow_zones <= self.n_zones:
            raise ValueError("n_slow_zones must be between 0 and n_zones")
        if self.peak_orders_per_minute <= 0 or self.ping_interval_s <= 0:
            raise ValueError("peak_orders_per_minute and ping_interval_s must be positive")


DEFAULT_CITY = CityConfig()


@dataclass(frozen=True, slots=True)
class Zone:
    zone_id: str
    base_speed_kmh: float
    slow: bool
    lat: float  # south-west corner of the zone's cell
    lon: float


@dataclass(frozen=True, slots=True)
class Restaurant:
    restaurant_id: str
    zone_index: int
    popularity: float  # relative weight in the choice of restaurant for an order
    base_prep_s: float  # prep time of an idle kitchen
    kitchen_capacity: float  # orders per 15 minutes at which prep time has grown by 120%


def _bump(hour: float, center: float, width: float) -> float:
    return math.exp(-0.5 * ((hour - center) / width) ** 2)


@lru_cache(maxsize=1)
def demand_by_minute() -> tuple[float, ...]:
    """Relative order rate per minute of the UTC day, 1.0 at the busiest minute.

    Lunch peaks around 12:30 (11:30-13:30), dinner around 19:30 (18:00-21:00); a daytime plateau
    sits between them and nights fall to ~3% of the peak.
    """
    raw = []
    for minute in range(MINUTES_PER_DAY):
        hour = minute / 60
        daytime = 1 / (1 + math.exp(-2 * (hour - 9))) / (1 + math.exp(2 * (hour - 23)))
        rushes = 0.8 * _bump(hour, 12.5, 0.7) + 0.95 * _bump(hour, 19.5, 1.0)
        raw.append(0.03 + 0.15 * daytime + rushes)
    return tuple(r / max(raw) for r in raw)


@lru_cache(maxsize=1)
def speed_factor_by_minute() -> tuple[float, ...]:
    """Traffic slowdown per minute of the day (commute, lunch and evening rushes): 0.65..1."""
    factors = []
    for minute in range(MINUTES_PER_DAY):
        hour = minute / 60
        rushes = 0.6 * _bump(hour, 8.5, 1.0) + 0.7 * _bump(hour, 12.5, 0.8) + _bump(hour, 18.5, 1.2)
        factors.append(1 - 0.35 * min(1.0, rushes))
    return tuple(factors)


def on_shift_share(demand: float) -> float:
    """Share of couriers working when demand is at ``demand`` (relative to the peak)."""
    return 0.15 + 0.85 * demand


def realtime_intensity(city: CityConfig, target_events_per_s: float) -> float:
    """Intensity at which the simulator averages ``target_events_per_s`` over a day of sim time.

    Orders and deliveries each arrive at peak * demand; every on-shift courier pings once per
    ping interval. All of these scale linearly with intensity.
    """
    if target_events_per_s <= 0:
        raise ValueError("target_events_per_s must be positive")
    demand = demand_by_minute()
    orders_per_s = city.peak_orders_per_minute / 60 * sum(demand) / len(demand)
    couriers = city.n_couriers * sum(on_shift_share(d) for d in demand) / len(demand)
    return target_events_per_s / (2 * orders_per_s + couriers / city.ping_interval_s)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_minute_prefixes: dict[int, str] = {}
_SECONDS = tuple(f"{s:02d}." for s in range(60))
_MILLIS_UTC = tuple(f"{ms:03d}+00:00" for ms in range(1000))


def iso_utc_ms(epoch_ms: int) -> str:
    """ISO-8601 UTC with milliseconds, e.g. 2026-11-23T12:00:00.123+00:00.

    Formatting through datetime costs more than the rest of a ping, so the "YYYY-MM-DDTHH:MM:"
    prefix is cached per minute and seconds and milliseconds come from small tables.
    """
    minute, in_minute = divmod(epoch_ms, MINUTE_MS)
    prefix = _minute_prefixes.get(minute)
    if prefix is None:
        if len(_minute_prefixes) > 4096:
            _minute_prefixes.clear()
        prefix = (_EPOCH + timedelta(minutes=minute)).strftime("%Y-%m-%dT%H:%M:")
        _minute_prefixes[minute] = prefix
    return prefix + _SECONDS[in_minute // 1000] + _MILLIS_UTC[in_minute % 1000]


_GRID_STEPS = 1000


def _grid(start: float, extent: float) -> tuple[float, ...]:
    return tuple(round(start + extent * (i + 0.5) / _GRID_STEPS, 5) for i in range(_GRID_STEPS))


# Kinds of scheduled work in the simulator's heap.
_TICK, _ORDER, _PING, _DELIVERY = 0, 1, 2, 3
# A delivery waiting in the heap: restaurant, zone, courier (indexes), distance (10 m units), prep
# and delivery time (0.1 s units), placed at (epoch ms). Integers keep the rounded values exact.
_PENDING = struct.Struct("<IHIIIIq")


class DeliverySimulator:
    """Orders, courier pings and deliveries for one city, from ``start_ms`` onwards.

    ``intensity`` scales the city rather than per-entity rates: restaurants, couriers and orders
    all grow by the factor, so a restaurant's load and a zone's speed look the same at any
    intensity (there are just more keys). The layout (zones, restaurants) depends on the seed.
    The stream starts cold: no orders in flight, so deliveries begin about 10 minutes in.
    """

    def __init__(
        self, seed: int, start_ms: int, city: CityConfig = DEFAULT_CITY, intensity: float = 1.0
    ) -> None:
        if not (math.isfinite(intensity) and intensity > 0):
            raise ValueError("intensity must be a positive number")
        self.seed, self.start_ms, self.city, self.intensity = seed, start_ms, city, intensity
        layout = random.Random(f"sluice-layout-{seed}")
        columns = math.ceil(math.sqrt(city.n_zones))
        slow = set(layout.sample(range(city.n_zones), city.n_slow_zones))
        self.zones = tuple(
            Zone(
                zone_id=f"z{i:02d}",
                # Slow zones: old town, pedestrian areas, hills; bikes crawl there.
                base_speed_kmh=layout.uniform(9, 13) if i in slow else layout.uniform(19, 27),
                slow=i in slow,
                lat=city.center_lat + (i // columns - columns / 2) * ZONE_CELL_LAT,
                lon=city.center_lon + (i % columns - columns / 2) * ZONE_CELL_LON,
            )
            for i in range(city.n_zones)
        )
        # Popularity ranks repeat per block of n_restaurants: a bigger city is more copies of the
        # same curve, so per-restaurant order rates do not depend on intensity.
        ranks = [i % city.n_restaurants + 1 for i in range(round(city.n_restaurants * intensity))]
        layout.shuffle(ranks)
        popularity = [rank**-city.popularity_exponent for rank in ranks or [1]]
        peak_orders_per_window = city.peak_orders_per_minute * intensity * 15 / sum(popularity)
        self.restaurants = tuple(
            Restaurant(
                restaurant_id=f"r{i:05d}",
                zone_index=layout.randrange(city.n_zones),
                popularity=weight,
                base_prep_s=layout.uniform(5 * 60, 25 * 60),
                # Popular places have bigger kitchens: sized a little above their usual peak.
                kitchen_capacity=max(3.0, 1.2 * weight * peak_orders_per_window),
            )
            for i, weight in enumerate(popularity)
        )
        n_couriers = max(1, round(city.n_couriers * intensity))
        self.courier_ids = tuple(f"c{i:05d}" for i in range(n_couriers))

    def events(self) -> Iterator[SourceEvent]:
        """The endless event stream, non-decreasing in event time. Each call starts afresh."""
        # Hot loop: state lives in local lists indexed by entity number, not in objects.
        city, intensity = self.city, self.intensity
        rng = random.Random(f"sluice-run-{self.seed}")
        rand, gauss, expovariate, exp = rng.random, rng.gauss, rng.expovariate, math.exp
        demand, speed_factor = demand_by_minute(), speed_factor_by_minute()
        order_rate_per_ms = [
            city.peak_orders_per_minute * intensity * d / MINUTE_MS for d in demand
        ]
        ping_interval_ms = city.ping_interval_s * 1000
        orders, pings, deliveries = ORDERS.name, COURIER_PINGS.name, DELIVERIES.name
        order_prefix = f"o{self.seed}-{self.start_ms // 1000}-"

        n_zones = len(self.zones)
        zone_ids = [z.zone_id for z in self.zones]
        # Pre-rounded positions across each zone cell (about 3 m apart): picking one is much
        # cheaper than rounding two random floats per ping.
        zone_lats = [_grid(z.lat, ZONE_CELL_LAT) for z in self.zones]
        zone_lons = [_grid(z.lon, ZONE_CELL_LON) for z in self.zones]
        zone_drift = [1.0] * n_zones
        zone_speed_now = [z.base_speed_kmh for z in self.zones]

        restaurant_ids = [r.restaurant_id for r in self.restaurants]
        restaurant_zone = [r.zone_index for r in self.restaurants]
        base_prep = [r.base_prep_s for r in self.restaurants]
        kitchen_capacity = [r.kitchen_capacity for r in self.restaurants]
        popularity_cum = list(itertools.accumulate(r.popularity for r in self.restaurants))
        last_restaurant = len(popularity_cum) - 1
        recent_orders: list[deque[int]] = [deque() for _ in self.restaurants]

        courier_ids = self.courier_ids
        courier_zone = [rng.randrange(n_zones) for _ in courier_ids]
        # A courier's scheduled ping is only valid while its shift generation is unchanged.
        shift_generation = [0] * len(courier_ids)
        on_shift: list[int] = []
        off_shift = list(range(len(courier_ids)))

        sequence = itertools.count()  # heap tie-breaker: equal times keep scheduling order
        order_numbers = itertools.count(1)
        heap: list[tuple[int, int, int, Any, Any]] = []

        def next_order_time(t: float) -> float:
            # Non-homogeneous Poisson process by time rescaling over per-minute constant rates.
            need = expovariate(1.0)
            while True:
                minute = int(t // MINUTE_MS)
                end = (minute + 1) * MINUTE_MS
                rate = order_rate_per_ms[minute % MINUTES_PER_DAY]
                if need <= rate * (end - t):
                    return t + need / rate
                need -= rate * (end - t)
                t = end

        def tick(t: int) -> None:
            """Once a minute: move zone speeds, bring couriers on or off shift."""
            minute_of_day = (t // MINUTE_MS) % MINUTES_PER_DAY
            traffic = speed_factor[minute_of_day]
            for z, zone in enumerate(self.zones):
                drift = 1 + (zone_drift[z] - 1) * ZONE_DRIFT_KEEP + ZONE_DRIFT_NOISE * gauss()
                zone_drift[z] = min(1.3, max(0.7, drift))
                zone_speed_now[z] = zone.base_speed_kmh * traffic * zone_drift[z]
            target = max(1, round(len(courier_ids) * on_shift_share(demand[minute_of_day])))
            while len(on_shift) != target:
                starting = len(on_shift) < target
                pool, other = (off_shift, on_shift) if starting else (on_shift, off_shift)
                pick = int(rand() * len(pool))
                pool[pick], pool[-1] = pool[-1], pool[pick]
                courier = pool.pop()
                other.append(courier)
                shift_generation[courier] += 1
                if starting:
                    first_ping = t + int(ping_interval_ms * rand())
                    entry = (first_ping, next(sequence), _PING, courier, shift_generation[courier])
                    heappush(heap, entry)

        def place_order(t: int) -> dict[str, Any]:
            """An order's payload; schedules the delivery it will become."""
            restaurant = min(bisect(popularity_cum, rand() * popularity_cum[-1]), last_restaurant)
            recent = recent_orders[restaurant]
            while recent and recent[0] <= t - LOAD_WINDOW_MS:
                recent.popleft()
            recent.append(t)
            zone = restaurant_zone[restaurant]
            items = min(100, 1 + int(expovariate(0.6)))
            distance_10m = round(min(1500, max(30, 300 * exp(0.5 * gauss()))))  # 10-metre units
            # A kitchen slows down with its recent orders relative to its size; capped because
            # past that point a real app pauses the restaurant.
            utilization = min(2.0, len(recent) / kitchen_capacity[restaurant])
            prep_s = base_prep[restaurant] * (1 + 1.2 * utilization) * exp(0.15 * gauss())
            # The zone's speed now stands in for its speed during the ride: drift changes little
            # within the ~30 minutes until the food is on its way.
            travel_s = distance_10m / 100 / zone_speed_now[zone] * 3600
            delivery_s = prep_s + 120 + 240 * rand() + travel_s + 60 * gauss()
            delivery_tenths_s = round(min(11 * 3600.0, max(delivery_s, prep_s + 60)) * 10)
            courier = on_shift[int(rand() * len(on_shift))]
            courier_zone[courier] = zone  # dispatch sends the courier to the restaurant
            order_number = next(order_numbers)
            # Pending deliveries are many (orders/s x ~45 min): packed, one takes ~250 bytes.
            pending = _PENDING.pack(
                restaurant, zone, courier, distance_10m, round(prep_s * 10), delivery_tenths_s, t
            )
            entry = (t + delivery_tenths_s * 100, next(sequence), _DELIVERY, order_number, pending)
            heappush(heap, entry)
            return {
                "order_id": f"{order_prefix}{order_number}",
                "restaurant_id": restaurant_ids[restaurant],
                "zone_id": zone_ids[zone],
                "items": items,
                "subtotal": round(min(10_000.0, items * 9.5 * exp(0.35 * gauss())), 2),
                "distance_km": distance_10m / 100,
                "placed_at": iso_utc_ms(t),
            }

        heappush(heap, (self.start_ms, next(sequence), _TICK, 0, 0))
        first_order = next_order_time(float(self.start_ms))
        heappush(heap, (int(first_order), next(sequence), _ORDER, first_order, 0))
        while True:
            t, _, kind, a, b = heap[0]
            if kind == _PING:  # a: courier, b: its shift generation when scheduled
                if b != shift_generation[a]:
                    heappop(heap)  # the shift ended after this ping was scheduled
                    continue
                if rand() < ZONE_HOP_PER_PING:
                    courier_zone[a] = int(rand() * n_zones)
                zone = courier_zone[a]
                if rand() < IDLE_PING_SHARE:
                    speed = 3 * rand()
                else:  # sum of three uniforms: near-normal noise (sd 0.12) at a third of gauss()
                    speed = zone_speed_now[zone] * (1 + 0.25 * (rand() + rand() + rand() - 1.5))
                next_ping = t + int(ping_interval_ms * (0.9 + 0.2 * rand()))
                heapreplace(heap, (next_ping, next(sequence), _PING, a, b))
                courier_id = courier_ids[a]
                yield SourceEvent(
                    pings,
                    courier_id,
                    t,
                    {
                        "courier_id": courier_id,
                        "zone_id": zone_ids[zone],
                        "speed_kmh": int(speed * 10 + 0.5) / 10,
                        "lat": zone_lats[zone][int(rand() * _GRID_STEPS)],
                        "lon": zone_lons[zone][int(rand() * _GRID_STEPS)],
                        "pinged_at": iso_utc_ms(t),
                    },
                )
            elif kind == _ORDER:  # a: exact (float) order time
                order = place_order(t)  # pushes a later delivery: heap[0] is still this order
                following = next_order_time(a)
                heapreplace(heap, (int(following), next(sequence), _ORDER, following, 0))
                yield SourceEvent(orders, order["restaurant_id"], t, order)
            elif kind == _DELIVERY:  # a: order number, b: packed by place_order
                heappop(heap)
                restaurant, zone, courier, distance, prep, duration, placed_ms = _PENDING.unpack(b)
                order_id = f"{order_prefix}{a}"
                yield SourceEvent(
                    deliveries,
                    order_id,
                    t,
                    {
                        "order_id": order_id,
                        "restaurant_id": restaurant_ids[restaurant],
                        "zone_id": zone_ids[zone],
                        "courier_id": courier_ids[courier],
                        "distance_km": distance / 100,
                        "prep_seconds": prep / 10,
                        "delivery_seconds": duration / 10,
                        "placed_at": iso_utc_ms(placed_ms),
                        "delivered_at": iso_utc_ms(t),
                    },
                )
            else:
                heapreplace(heap, ((t // MINUTE_MS + 1) * MINUTE_MS, next(sequence), _TICK, 0, 0))
                tick(t)


class CorruptionKind(StrEnum):
    """The ways ``corrupt`` breaks an event."""

    TRUNCATED_JSON = "truncated_json"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    TIME_OUT_OF_RANGE = "time_out_of_range"
    NUMBER_OUT_OF_RANGE = "number_out_of_range"


# Values sloppy producers really send: numbers as strings, booleans for numbers, naive times...
_WRONG_TYPE_VALUES: dict[FieldType, tuple[Any, ...]] = {
    FieldType.STRING: (42, True, ["a"]),
    FieldType.INT: (True, "3", 2.5),
    FieldType.FLOAT: ("3.5", False, {"value": 3.5}),
    FieldType.BOOL: ("true", 1),
    FieldType.TIMESTAMP: (True, 1.7e12, "yesterday", "2026-11-23T12:00:00"),
}
_OUT_OF_RANGE_TIMES = ("1970-01-01T00:00:00.000+00:00", "2100-01-01T00:00:00.000+00:00")


def corrupt(
    rng: random.Random,
    source: EventSource,
    payload: dict[str, Any],
    kind: CorruptionKind | None = None,
) -> tuple[bytes, RejectReason, str | None]:
    """A malformed copy of a valid ``payload``: (raw bytes, expected reason, expected field).

    Exactly one thing is broken, so EventValidator must report that reason and field (None for
    bad JSON). Time corruption assumes a validating clock before 2100. ``kind`` is drawn from
    ``rng`` unless given.
    """
    kind = kind or rng.choice(list(CorruptionKind))
    doc = dict(payload)
    bounded = [f for f in source.fields if f.minimum is not None or f.maximum is not None]
    if kind is CorruptionKind.NUMBER_OUT_OF_RANGE and not bounded:
        kind = CorruptionKind.TIME_OUT_OF_RANGE  # nothing numeric with bounds to push out
    if kind is CorruptionKind.TRUNCATED_JSON:
        raw = orjson.dumps(doc)
        # Any proper prefix of a JSON object is invalid: at least the closing brace is missing.
        return raw[: rng.randrange(1, len(raw))], RejectReason.INVALID_JSON, None
    if kind is CorruptionKind.MISSING_FIELD:
        name = rng.choice(source.field_names)
        del doc[name]
        return orjson.dumps(doc), RejectReason.MISSING_FIELD, name
    if kind is CorruptionKind.WRONG_TYPE:
        field = rng.choice(source.fields)
        doc[field.name] = rng.choice(_WRONG_TYPE_VALUES[field.type])
        return orjson.dumps(doc), RejectReason.WRONG_TYPE, field.name
    if kind is CorruptionKind.TIME_OUT_OF_RANGE:
        doc[source.event_time_field] = rng.choice(_OUT_OF_RANGE_TIMES)
        return orjson.dumps(doc), RejectReason.OUT_OF_RANGE, source.event_time_field
    field = rng.choice(bounded)
    outside = []
    if field.maximum is not None:
        outside.append(field.maximum + 1 + abs(field.maximum))
    if field.minimum is not None:
        outside.append(field.minimum - 1 - abs(field.minimum))
    value = rng.choice(outside)
    doc[field.name] = int(value) if field.type is FieldType.INT else value
    return orjson.dumps(doc), RejectReason.OUT_OF_RANGE, field.name
