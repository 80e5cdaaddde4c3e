"""A definitions module for live tests of `sluice stream`: the example's sources with 2 s of
allowed lateness (the default, stated here so the tests do not depend on it) and views of
1-minute windows sliding every 5 s (servable 5 s after their end, the default lateness), so
that a 20-second live run closes windows (the example's views slide every minute)."""

from __future__ import annotations

from datetime import timedelta

from examples.delivery import sources as examples
from examples.delivery.features import produce, restaurant, zone
from features.definitions import Aggregation, AggregationFunction, FeatureView, Window

Agg = AggregationFunction
EVERY_5S = (Window.sliding("1m", every="5s"),)
LATENESS = timedelta(seconds=2)
__all__ = ["produce"]  # the delivery simulator is this domain's `sluice produce` hook
# Module attributes are definitions (features/registry.py): the originals stay in `examples`.
orders = examples.ORDERS.model_copy(update={"allowed_lateness": LATENESS})
courier_pings = examples.COURIER_PINGS.model_copy(update={"allowed_lateness": LATENESS})

live_restaurant_orders = FeatureView(
    name="live_restaurant_orders",
    entity=restaurant,
    source=orders,
    aggregations=(
        Aggregation(function=Agg.COUNT, windows=EVERY_5S),
        Aggregation(function=Agg.SUM, column="items", windows=EVERY_5S),
        Aggregation(function=Agg.MEAN, column="subtotal", windows=EVERY_5S),
    ),
    ttl=timedelta(minutes=10),
)

live_zone_couriers = FeatureView(
    name="live_zone_couriers",
    entity=zone,
    source=courier_pings,
    aggregations=(
        Aggregation(function=Agg.MEAN, column="speed_kmh", windows=EVERY_5S),
        Aggregation(function=Agg.STDDEV, column="speed_kmh", windows=EVERY_5S),
        Aggregation(function=Agg.COUNT_DISTINCT, column="courier_id", windows=EVERY_5S),
    ),
    ttl=timedelta(minutes=10),
)
