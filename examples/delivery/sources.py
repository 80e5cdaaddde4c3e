"""Food delivery: the built-in example domain.

Three event streams: orders placed, courier location pings, and deliveries completed. The last
carries the label (the actual delivery duration), which arrives long after the order.
"""

from __future__ import annotations

from features.schema import EventSource, Field, FieldType

S, INT, F, T = FieldType.STRING, FieldType.INT, FieldType.FLOAT, FieldType.TIMESTAMP

ORDERS = EventSource(
    name="orders",
    description="An order placed by a customer at a restaurant.",
    key_field="restaurant_id",
    event_time_field="placed_at",
    fields=(
        Field(name="order_id", type=S),
        Field(name="restaurant_id", type=S),
        Field(name="zone_id", type=S),
        Field(name="items", type=INT, minimum=1, maximum=100),
        Field(name="subtotal", type=F, minimum=0, maximum=10_000),
        Field(
            name="distance_km",
            type=F,
            minimum=0,
            maximum=100,
            description="Restaurant to customer, known when the order is placed.",
        ),
        Field(name="placed_at", type=T),
    ),
)

COURIER_PINGS = EventSource(
    name="courier_pings",
    description="A courier's periodic location ping.",
    key_field="courier_id",
    event_time_field="pinged_at",
    fields=(
        Field(name="courier_id", type=S),
        Field(name="zone_id", type=S),
        Field(name="speed_kmh", type=F, minimum=0, maximum=150),
        Field(name="lat", type=F, minimum=-90, maximum=90),
        Field(name="lon", type=F, minimum=-180, maximum=180),
        Field(name="pinged_at", type=T),
    ),
)

DELIVERIES = EventSource(
    name="deliveries",
    description="A delivery completed; delivery_seconds is the label for ETA models.",
    key_field="order_id",
    event_time_field="delivered_at",
    # Labels arrive late by nature; they are joined by order time, not by arrival.
    fields=(
        Field(name="order_id", type=S),
        Field(name="restaurant_id", type=S),
        Field(name="zone_id", type=S),
        Field(name="courier_id", type=S),
        Field(name="distance_km", type=F, minimum=0, maximum=100),
        Field(name="prep_seconds", type=F, minimum=0, maximum=6 * 3600),
        Field(name="delivery_seconds", type=F, minimum=0, maximum=12 * 3600),
        Field(name="placed_at", type=T),
        Field(name="delivered_at", type=T),
    ),
)

SOURCES: tuple[EventSource, ...] = (ORDERS, COURIER_PINGS, DELIVERIES)
SOURCES_BY_NAME = {s.name: s for s in SOURCES}
