"""Feature definitions of the food-delivery example: what an ETA model reads."""

from __future__ import annotations

from datetime import timedelta

from examples.delivery.sources import COURIER_PINGS, DELIVERIES, ORDERS
from features.definitions import (
    Aggregation,
    AggregationFunction,
    BatchFeatureView,
    Entity,
    FeatureService,
    FeatureView,
    RequestFeatures,
    Window,
)
from features.schema import Field, FieldType

Agg = AggregationFunction
EVERY_MINUTE = [Window.sliding(size, every="1m") for size in ("5m", "15m", "1h")]

restaurant = Entity(name="restaurant", join_key="restaurant_id", description="A restaurant.")
zone = Entity(name="zone", join_key="zone_id", description="A delivery zone of the city.")

restaurant_orders = FeatureView(
    name="restaurant_orders",
    entity=restaurant,
    source=ORDERS,
    description="How busy a restaurant's kitchen is right now.",
    aggregations=(
        Aggregation(function=Agg.COUNT, windows=tuple(EVERY_MINUTE)),
        Aggregation(function=Agg.SUM, column="items", windows=(EVERY_MINUTE[1],)),
        Aggregation(function=Agg.MEAN, column="subtotal", windows=(EVERY_MINUTE[2],)),
    ),
    ttl=timedelta(hours=2),
    owner="eta-team",
)

zone_couriers = FeatureView(
    name="zone_couriers",
    entity=zone,
    source=COURIER_PINGS,
    description="Courier supply and traffic speed in a zone.",
    aggregations=(
        Aggregation(function=Agg.MEAN, column="speed_kmh", windows=(EVERY_MINUTE[0],)),
        Aggregation(function=Agg.STDDEV, column="speed_kmh", windows=(EVERY_MINUTE[0],)),
        Aggregation(
            function=Agg.COUNT_DISTINCT,
            column="courier_id",
            windows=(Window.sliding("10m", every="1m"),),
        ),
    ),
    ttl=timedelta(hours=2),
    owner="eta-team",
)

restaurant_prep = BatchFeatureView(
    name="restaurant_prep",
    entity=restaurant,
    source=DELIVERIES,
    description="A restaurant's usual preparation and delivery times, refreshed daily.",
    derived={"delivery_minutes": "delivery_seconds / 60"},
    aggregations=(
        Aggregation(
            function=Agg.MEAN,
            column="prep_seconds",
            windows=(Window.sliding("30d", every="1d"),),
        ),
        Aggregation(
            function=Agg.MEAN,
            column="delivery_minutes",
            windows=(Window.sliding("30d", every="1d"),),
        ),
        Aggregation(function=Agg.COUNT, windows=(Window.sliding("30d", every="1d"),)),
    ),
    ttl=timedelta(days=3),
    owner="eta-team",
)

order_request = RequestFeatures(
    name="order_request",
    description="Known when the order is placed; supplied by the caller.",
    fields=(
        Field(name="distance_km", type=FieldType.FLOAT, minimum=0, maximum=100),
        Field(name="hour_of_day", type=FieldType.INT, minimum=0, maximum=23),
        Field(name="items", type=FieldType.INT, minimum=1, maximum=100),
    ),
)

delivery_eta = FeatureService(
    name="delivery_eta",
    description="ETA model: batch, streaming and request features.",
    views=(restaurant_orders, zone_couriers, restaurant_prep),
    request=(order_request,),
)

delivery_eta_batch_only = FeatureService(
    name="delivery_eta_batch_only",
    description="Baseline ETA model without streaming features, to measure what they add.",
    views=(restaurant_prep,),
    request=(order_request,),
)

ENTITIES = (restaurant, zone)
VIEWS = (restaurant_orders, zone_couriers, restaurant_prep)
REQUEST_FEATURES = (order_request,)
SERVICES = (delivery_eta, delivery_eta_batch_only)
