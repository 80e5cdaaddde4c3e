"""Feature definitions of the food-delivery example: what an ETA model reads.

This module is the domain (settings.definitions_module): its definitions, the labels that
`sluice train` learns from, and two hooks the CLI looks up by name, ``produce`` (the city
simulator behind `sluice produce`) and ``demo`` (`sluice demo`). The hooks import their modules
only when called, so loading the definitions stays light.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

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
from features.labels import LabelJoin, Labels
from features.schema import Field, FieldType

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console

    from core.settings import Settings
    from examples.delivery.produce import ProduceReport

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

# One label per delivery, at the time its order was placed: features must be those known then.
delivery_times = Labels(
    name="delivery_times",
    description="Actual delivery durations, joined with the order's item count.",
    source=DELIVERIES,
    label="delivery_seconds",
    time_field="placed_at",
    entities={"restaurant": "restaurant_id", "zone": "zone_id"},
    request={"distance_km": "distance_km", "hour_of_day": "hour(placed_at)", "items": "items"},
    joins=(LabelJoin(source=ORDERS, on="order_id", columns=("items",)),),
    services=("delivery_eta", "delivery_eta_batch_only"),
)

ENTITIES = (restaurant, zone)
VIEWS = (restaurant_orders, zone_couriers, restaurant_prep)
REQUEST_FEATURES = (order_request,)
SERVICES = (delivery_eta, delivery_eta_batch_only)
LABELS = (delivery_times,)


def produce(
    settings: Settings,
    n_events: int,
    *,
    seed: int = 7,
    start_ms: int | None = None,
    rate: float | None = None,
    corrupt_fraction: float = 0.0,
    to_kafka: bool = True,
    history_dir: Path | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> ProduceReport:
    """Domain hook of `sluice produce`: simulated city traffic (examples/delivery/produce.py)."""
    from examples.delivery.produce import produce_synthetic

    return produce_synthetic(
        settings,
        n_events,
        seed=seed,
        start_ms=start_ms,
        rate=rate,
        corrupt_fraction=corrupt_fraction,
        to_kafka=to_kafka,
        history_dir=history_dir,
        on_progress=on_progress,
    )


def demo(settings: Settings, console: Console, *, events: int, keep_up: bool) -> None:
    """Domain hook of `sluice demo`: the pipeline end to end (examples/delivery/demo.py)."""
    from examples.delivery.demo import run_demo

    run_demo(settings, console, events=events, keep_up=keep_up)
