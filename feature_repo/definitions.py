"""features/ definitions -> Feast objects: the one module of this repository that Feast reads.

feast_objects() translates a loaded Registry. `feast apply` (run in feature_repo/) imports this
file and collects the Feast objects it finds among the module's attributes; those are built on
first access (PEP 562 module __getattr__/__dir__) from settings.definitions_module, so importing
the translation elsewhere (the CLI, tests) neither imports Feast nor loads anyone's definitions.

Mapping:
- Entity -> feast.Entity (one string join key).
- FeatureView and BatchFeatureView -> FileSource "<view>_offline" over
  <offline_store_dir>/<view> (hive-partitioned parquet, timestamp servable_timestamp = window end +
  lateness, created_timestamp for duplicates) and a feast.FeatureView with the features' types, ttl,
  online flag and tags kind / engines / owner / source.
- RequestFeatures -> a standalone RequestSource with its schema. Feast 0.67 refuses a
  RequestSource inside a FeatureService (only views and on-demand views are accepted), so each
  FeatureService lists the request sources it reads in its tag "request_sources".
- FeatureService -> feast.FeatureService over its views.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from core.settings import Settings, load_settings
from feature_repo.errors import FeastTranslationError
from features.definitions import FeatureView, RequestFeatures
from features.registry import Registry, load_registry
from features.schema import FieldType

OFFLINE_SOURCE_SUFFIX = "_offline"
REQUEST_SOURCES_TAG = "request_sources"
# Columns every offline file has besides the features; "date" is the hive partition column,
# which Feast's file store reads back as a column too.
RESERVED_COLUMNS = frozenset({"event_timestamp", "servable_timestamp", "created_timestamp", "date"})


def offline_source_name(view_name: str) -> str:
    return f"{view_name}{OFFLINE_SOURCE_SUFFIX}"


def _feast_type(dtype: FieldType, owner: str, field: str) -> Any:
    from feast import types

    mapping = {
        FieldType.INT: types.Int64,
        FieldType.FLOAT: types.Float64,
        FieldType.STRING: types.String,
        FieldType.BOOL: types.Bool,
        FieldType.TIMESTAMP: types.UnixTimestamp,
    }
    if dtype not in mapping:
        raise FeastTranslationError(f"{owner}: field {field!r}: type {dtype} has no Feast type")
    return mapping[dtype]


def _view(view: FeatureView, entity: Any, settings: Settings) -> tuple[Any, Any]:
    from feast import FeatureView as FeastFeatureView
    from feast import Field, FileSource
    from feast.types import String

    owner = f"{'BatchFeatureView' if view.kind == 'batch' else 'FeatureView'} {view.name!r}"
    schema = [Field(name=view.entity.join_key, dtype=String)]
    for spec in view.features():
        if spec.name in RESERVED_COLUMNS or spec.name == view.entity.join_key:
            raise FeastTranslationError(
                f"{owner}: feature {spec.name!r} clashes with a column of the offline store"
            )
        if spec.dtype is FieldType.TIMESTAMP:
            # The offline contract and the online codec carry int, float, string and bool.
            raise FeastTranslationError(
                f"{owner}: feature {spec.name!r}: timestamp features are not supported yet"
            )
        schema.append(Field(name=spec.name, dtype=_feast_type(spec.dtype, owner, spec.name)))
    source = FileSource(
        name=offline_source_name(view.name),
        path=str((settings.offline_store_dir / view.name).resolve()),
        # The servable time (window end + lateness), so that Feast's point-in-time join serves
        # what the availability contract says (features/contract.py), like training and serving.
        timestamp_field="servable_timestamp",
        created_timestamp_column="created_timestamp",
        description=f"Offline rows of {view.name}: one per entity and window end.",
    )
    tags = {
        "kind": view.kind,
        "engines": ",".join(view.engines),
        "owner": view.owner,
        "source": view.source.name,
    }
    feast_view = FeastFeatureView(
        name=view.name,
        entities=[entity],
        source=source,
        schema=schema,
        ttl=view.ttl,
        online=view.online,
        description=view.description,
        owner=view.owner,
        tags=tags,
    )
    return source, feast_view


def _request_source(request: RequestFeatures) -> Any:
    from feast import Field, RequestSource

    owner = f"RequestFeatures {request.name!r}"
    return RequestSource(
        name=request.name,
        schema=[
            Field(name=f.name, dtype=_feast_type(f.type, owner, f.name)) for f in request.fields
        ],
        description=request.description,
    )


def _check_unique(names: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise FeastTranslationError(f"two Feast {what} are named {name!r}")
        seen.add(name)


def feast_objects(registry: Registry, settings: Settings) -> list[Any]:
    """Entities, data sources, feature views and services, in the order Feast applies them."""
    from feast import Entity, FeatureService, ValueType

    entities = {
        e.name: Entity(
            name=e.name,
            join_keys=[e.join_key],
            value_type=ValueType.STRING,
            description=e.description,
        )
        for e in registry.entities.values()
    }
    sources: list[Any] = []
    views: dict[str, Any] = {}
    for view in registry.views.values():
        source, views[view.name] = _view(view, entities[view.entity.name], settings)
        sources.append(source)
    sources += [_request_source(r) for r in registry.request_features.values()]
    _check_unique((s.name for s in sources), "data sources")
    services = [
        FeatureService(
            name=service.name,
            features=[views[v.name] for v in service.views],
            description=service.description,
            tags={REQUEST_SOURCES_TAG: ",".join(r.name for r in service.request)},
        )
        for service in registry.services.values()
    ]
    return [*entities.values(), *sources, *views.values(), *services]


def _attribute_name(obj: Any) -> str:
    from feast import Entity, FeatureService, FeatureView

    kind = (
        "entity"
        if isinstance(obj, Entity)
        else "view"
        if isinstance(obj, FeatureView)
        else "service"
        if isinstance(obj, FeatureService)
        else "source"
    )
    return f"{kind}_{obj.name}"


_exposed: dict[str, Any] = {}


def _module_objects() -> dict[str, Any]:
    """The objects `feast apply` discovers, from the settings' definitions module (cached)."""
    if not _exposed:
        settings = load_settings()
        objects = feast_objects(load_registry(settings.definitions_module), settings)
        _exposed.update({_attribute_name(obj): obj for obj in objects})
    return _exposed


def __getattr__(name: str) -> Any:
    # Only names that look like ours: Python probes modules for dunders (__path__, __wrapped__)
    # and those must not load definitions.
    if name.startswith(("entity_", "source_", "view_", "service_")):
        objects = _module_objects()
        if name in objects:
            return objects[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_module_objects()))
