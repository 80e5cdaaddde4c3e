"""features/ -> Feast objects and settings -> Feast configuration (imports Feast, no server)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from core.settings import Settings, load_settings
from examples.delivery.features import restaurant
from examples.delivery.sources import ORDERS
from feature_repo import definitions
from feature_repo.config import REPO_DIR, feast_env, feast_redis_connection, repo_config
from feature_repo.errors import FeastTranslationError, FeatureRepoError
from features.definitions import Aggregation, AggregationFunction, FeatureView, Window
from features.registry import Registry, load_registry

EXAMPLE = "examples.delivery.features"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    tmp = tmp_path_factory.mktemp("repo")
    return load_settings(
        redis_url="redis://:s3cret@cache.internal:6380/2",
        feast_registry=tmp / "registry.db",
        offline_store_dir=tmp / "offline",
        feast_project="unit_project",
    )


@pytest.fixture(scope="module")
def objects(settings: Settings) -> dict[str, object]:
    return {o.name: o for o in definitions.feast_objects(load_registry(EXAMPLE), settings)}


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", "127.0.0.1:6379,db=0"),
        ("redis://localhost", "localhost:6379,db=0"),
        ("redis://u:p%40ss@h:1/3", "h:1,db=3,username=u,password=p@ss"),
        ("rediss://:pw@h:6380/0", "h:6380,db=0,password=pw,ssl=true"),
    ],
)
def test_redis_urls_become_feast_connection_strings(url, expected):
    assert feast_redis_connection(url) == expected


def test_a_password_feast_cannot_parse_is_refused():
    with pytest.raises(FeatureRepoError, match="comma"):
        feast_redis_connection("redis://:a,b@h:1/0")


def test_feature_store_yaml_with_feast_env_is_the_config_built_in_code(settings, monkeypatch):
    from feast.repo_config import load_repo_config

    for key, value in feast_env(settings).items():
        monkeypatch.setenv(key, value)
    from_yaml = load_repo_config(REPO_DIR, REPO_DIR / "feature_store.yaml")
    in_code = repo_config(settings)
    assert from_yaml.project == in_code.project == "unit_project"
    assert from_yaml.registry.path == in_code.registry.path == str(settings.feast_registry)
    assert from_yaml.online_store.type == in_code.online_store.type == "redis"
    assert (
        from_yaml.online_store.connection_string
        == in_code.online_store.connection_string
        == "cache.internal:6380,db=2,password=s3cret"
    )
    assert type(from_yaml.offline_store) is type(in_code.offline_store)
    assert from_yaml.entity_key_serialization_version == 3
    assert in_code.entity_key_serialization_version == 3
    assert from_yaml.provider == in_code.provider == "local"


def test_entities_are_string_join_keys(objects):
    from feast import ValueType

    entity = objects["restaurant"]
    assert entity.join_key == "restaurant_id"
    assert entity.value_type == ValueType.STRING


def test_views_carry_types_ttl_online_flag_tags_and_source(objects, settings):
    from feast.types import Float64, Int64, String

    view = objects["restaurant_orders"]
    types = {f.name: f.dtype for f in view.features}
    assert types == {
        "count_5m": Int64,
        "count_15m": Int64,
        "count_1h": Int64,
        "sum_items_15m": Float64,
        "mean_subtotal_1h": Float64,
    }
    assert {f.name: f.dtype for f in view.entity_columns} == {"restaurant_id": String}
    assert view.ttl == timedelta(hours=2)
    assert view.online is True
    assert view.tags == {
        "kind": "stream",
        "engines": "spark,flink",
        "owner": "eta-team",
        "source": "orders",
    }
    source = view.batch_source
    assert source.name == "restaurant_orders_offline"
    assert Path(source.path) == settings.offline_store_dir / "restaurant_orders"
    assert source.timestamp_field == "servable_timestamp"
    assert source.created_timestamp_column == "created_timestamp"
    assert objects["restaurant_prep"].tags["kind"] == "batch"
    assert objects["restaurant_prep"].tags["engines"] == "spark"


def test_request_features_are_request_sources_named_by_services(objects):
    from feast import RequestSource
    from feast.types import Float64, Int64

    request = objects["order_request"]
    assert isinstance(request, RequestSource)
    assert {f.name: f.dtype for f in request.schema} == {
        "distance_km": Float64,
        "hour_of_day": Int64,
        "items": Int64,
    }
    service = objects["delivery_eta"]
    assert service.tags == {"request_sources": "order_request"}
    views = [p.name for p in service.feature_view_projections]
    assert views == ["restaurant_orders", "zone_couriers", "restaurant_prep"]


def test_timestamp_features_are_refused_naming_view_and_feature(settings):
    view = FeatureView(
        name="last_order",
        entity=restaurant,
        source=ORDERS,
        aggregations=(
            Aggregation(
                function=AggregationFunction.LAST,
                column="placed_at",
                windows=(Window.tumbling("5m"),),
            ),
        ),
    )
    registry = Registry(module="test", views={view.name: view}, entities={"restaurant": restaurant})
    with pytest.raises(FeastTranslationError, match=r"FeatureView 'last_order'.*last_placed_at_5m"):
        definitions.feast_objects(registry, settings)


def test_the_module_exposes_feast_objects_for_feast_apply(settings, monkeypatch):
    from feast import FeatureService, FeatureView

    monkeypatch.setenv("SLUICE_OFFLINE_STORE_DIR", str(settings.offline_store_dir))
    monkeypatch.setattr(definitions, "_exposed", {})
    with pytest.raises(AttributeError):
        definitions.__wrapped__  # noqa: B018  (Python's probes must not load definitions)
    assert definitions._exposed == {}
    names = dir(definitions)
    assert {"view_restaurant_orders", "service_delivery_eta", "entity_zone"} <= set(names)
    assert "source_order_request" in names
    assert isinstance(definitions.view_restaurant_orders, FeatureView)
    assert isinstance(definitions.service_delivery_eta, FeatureService)
    assert "feast_objects" in names
