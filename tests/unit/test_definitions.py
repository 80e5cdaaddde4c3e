"""Definition checks: every mistake names the definition and the field."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from examples.delivery import features as ex
from examples.delivery.sources import COURIER_PINGS, ORDERS
from features.definitions import (
    Aggregation,
    AggregationFunction,
    BatchFeatureView,
    Entity,
    FeatureService,
    FeatureView,
    RequestFeatures,
    Window,
    duration_name,
    empty_value,
    parse_duration,
)
from features.errors import FeatureDefinitionError
from features.registry import load_registry
from features.schema import FieldType

Agg = AggregationFunction
FIVE = Window.sliding("5m", every="1m")
shop = Entity(name="restaurant", join_key="restaurant_id")


def view(**overrides: Any) -> FeatureView:
    spec: dict[str, Any] = {
        "name": "v",
        "entity": shop,
        "source": ORDERS,
        "aggregations": (Aggregation(function=Agg.COUNT, windows=(FIVE,)),),
    }
    return FeatureView(**(spec | overrides))


def test_durations():
    assert parse_duration("90s") == timedelta(seconds=90)
    assert duration_name(timedelta(minutes=60)) == "1h"
    assert duration_name(timedelta(seconds=90)) == "90s"
    assert duration_name(timedelta(days=30)) == "30d"
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("5 minutes")


def test_feature_names_and_types():
    v = view(
        aggregations=(
            Aggregation(function=Agg.COUNT, windows=(FIVE, Window.sliding("1h", every="1m"))),
            Aggregation(function=Agg.MEAN, column="per_item", windows=(FIVE,)),
            Aggregation(function=Agg.LAST, column="zone_id", windows=(FIVE,)),
            Aggregation(function=Agg.COUNT_DISTINCT, column="zone_id", windows=(FIVE,)),
        ),
        derived={"per_item": "subtotal / items"},
        filter="items > 1",
    )
    assert [(f.name, f.dtype) for f in v.features()] == [
        ("count_5m", FieldType.INT),
        ("count_1h", FieldType.INT),
        ("mean_per_item_5m", FieldType.FLOAT),
        ("last_zone_id_5m", FieldType.STRING),
        ("count_distinct_zone_id_5m", FieldType.INT),
    ]
    assert v.max_window.name == "1h"
    assert v.slide_ms == 60_000
    assert [w.name for w in v.windows] == ["5m", "1h"]


def test_examples_have_expected_features():
    names = [f.name for f in ex.restaurant_orders.features()]
    assert names == ["count_5m", "count_15m", "count_1h", "sum_items_15m", "mean_subtotal_1h"]
    types = {f.name: f.dtype for f in ex.zone_couriers.features()}
    assert types["count_distinct_courier_id_10m"] is FieldType.INT
    assert types["mean_speed_kmh_5m"] is FieldType.FLOAT
    assert ex.restaurant_prep.engines == ("spark",)
    assert ex.restaurant_orders.engines == ("spark", "flink")
    assert ex.zone_couriers.key_column == "zone_id"
    assert ex.delivery_eta.feature_refs()[-3:] == (
        "order_request:distance_km",
        "order_request:hour_of_day",
        "order_request:items",
    )


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"name": "Bad-Name"}, "name", "lower_snake_case"),
        ({"key_column": "nope"}, "key_column", "not a field of orders"),
        ({"key_column": "items"}, "key_column", "must be a string"),
        ({"aggregations": ()}, "aggregations", "at least one"),
        (
            {"aggregations": (Aggregation(function=Agg.MEAN, windows=(FIVE,)),)},
            "aggregations[0].column",
            "needs a column",
        ),
        (
            {"aggregations": (Aggregation(function=Agg.MEAN, column="zone", windows=(FIVE,)),)},
            "aggregations[0].column",
            "unknown column 'zone'",
        ),
        (
            {"aggregations": (Aggregation(function=Agg.SUM, column="zone_id", windows=(FIVE,)),)},
            "aggregations[0].column",
            "numeric",
        ),
        (
            {
                "aggregations": (
                    Aggregation(function=Agg.COUNT, windows=(FIVE,)),
                    Aggregation(function=Agg.COUNT, windows=(Window.tumbling("1h"),)),
                )
            },
            "aggregations",
            "share one slide",
        ),
        (
            {"aggregations": (Aggregation(function=Agg.COUNT, windows=(FIVE, FIVE)),)},
            "aggregations[0]",
            "defined twice",
        ),
        ({"filter": "items + 1"}, "filter", "boolean"),
        ({"filter": "items >"}, "filter", "unexpected end"),
        ({"derived": {"items": "items * 2"}}, "derived.items", "shadows"),
        ({"derived": {"x": "zone_id * 2"}}, "derived.x", "needs numbers"),
        ({"ttl": timedelta(seconds=10)}, "ttl", "at least the slide"),
    ],
)
def test_view_errors_name_the_field(overrides, field, words):
    with pytest.raises(FeatureDefinitionError) as info:
        view(**overrides)
    assert info.value.field == field, str(info.value)
    assert words in str(info.value)
    assert f"FeatureView {overrides.get('name', 'v')!r}" in str(info.value)


@pytest.mark.parametrize(
    ("window", "words"),
    [
        (Window.sliding("30s", every="10s"), "between 1 minute and 30 days"),
        (Window.sliding("31d", every="1d"), "between 1 minute and 30 days"),
        (Window.sliding("5m", every="10m"), "slide must be between"),
        (Window.sliding("5m", every="2m"), "whole multiple"),
        (Window(size=timedelta(minutes=5), slide=timedelta(seconds=1.5)), "whole seconds"),
    ],
)
def test_window_errors(window, words):
    with pytest.raises(FeatureDefinitionError, match=words):
        view(aggregations=(Aggregation(function=Agg.COUNT, windows=(window,)),))


def test_batch_view_and_derived_column_types():
    v = BatchFeatureView(
        name="b",
        entity=shop,
        source=ORDERS,
        derived={"per_item": "subtotal / items", "big": "items > 3"},
        aggregations=(
            Aggregation(function=Agg.MEAN, column="per_item", windows=(FIVE,)),
            Aggregation(function=Agg.LAST, column="big", windows=(FIVE,)),
        ),
    )
    assert v.kind == "batch"
    assert {f.name: f.dtype for f in v.features()} == {
        "mean_per_item_5m": FieldType.FLOAT,
        "last_big_5m": FieldType.BOOL,
    }
    with pytest.raises(FeatureDefinitionError, match="BatchFeatureView 'b'"):
        BatchFeatureView(name="b", entity=shop, source=ORDERS, aggregations=())


def test_empty_values_in_one_place():
    assert empty_value(Agg.COUNT) == 0
    assert empty_value(Agg.COUNT_DISTINCT) == 0
    assert empty_value(Agg.SUM) == 0.0
    for fn in (Agg.MEAN, Agg.MIN, Agg.MAX, Agg.LAST, Agg.STDDEV):
        assert empty_value(fn) is None


def test_service_and_entity_errors():
    with pytest.raises(FeatureDefinitionError, match="appears twice"):
        FeatureService(name="s", views=(ex.restaurant_orders, ex.restaurant_orders))
    with pytest.raises(FeatureDefinitionError, match="reads nothing"):
        FeatureService(name="s", views=())
    with pytest.raises(FeatureDefinitionError, match="Entity 'Zone'"):
        Entity(name="Zone", join_key="zone_id")
    with pytest.raises(FeatureDefinitionError, match="none declared"):
        RequestFeatures(name="r", fields=())


def test_registry_collects_everything():
    registry = load_registry("examples.delivery.features")
    assert set(registry.views) == {"restaurant_orders", "zone_couriers", "restaurant_prep"}
    assert set(registry.sources) == {"orders", "courier_pings", "deliveries"}
    assert set(registry.services) == {"delivery_eta", "delivery_eta_batch_only"}
    assert registry.get("zone") == ex.zone
    assert COURIER_PINGS.name in registry.names()
    with pytest.raises(FeatureDefinitionError, match="No module named"):
        load_registry("examples.nope")
