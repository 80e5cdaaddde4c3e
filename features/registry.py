"""Collecting definitions from a module into one checked registry.

A definitions module declares Entity, EventSource, FeatureView, BatchFeatureView,
RequestFeatures and FeatureService objects at top level (like a Feast repo's Python files).
Loading it imports the module, gathers those objects, and checks what single definitions cannot
check alone: unique names, and services that read only registered views.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from features.definitions import Entity, FeatureService, FeatureView, RequestFeatures
from features.errors import FeatureDefinitionError
from features.schema import EventSource


@dataclass(frozen=True)
class Registry:
    module: str
    entities: dict[str, Entity] = field(default_factory=dict)
    sources: dict[str, EventSource] = field(default_factory=dict)
    views: dict[str, FeatureView] = field(default_factory=dict)
    request_features: dict[str, RequestFeatures] = field(default_factory=dict)
    services: dict[str, FeatureService] = field(default_factory=dict)

    def names(self) -> dict[str, str]:
        """Every definition name -> its kind."""
        out: dict[str, str] = {}
        for kind, group in (
            ("entity", self.entities),
            ("source", self.sources),
            ("view", self.views),
            ("request", self.request_features),
            ("service", self.services),
        ):
            out.update({name: kind for name in group})
        return out

    def get(self, name: str) -> object:
        for group in (
            self.views,
            self.services,
            self.entities,
            self.sources,
            self.request_features,
        ):
            if name in group:
                return group[name]
        raise KeyError(name)


def load_registry(module_name: str) -> Registry:
    """Import the module and collect its definitions; raises FeatureDefinitionError."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise FeatureDefinitionError("module", module_name, "import", str(exc)) from None
    registry = Registry(module=module_name)
    for value in vars(module).values():
        _add(registry, value)
    # Views and services bring what they reference, even when not declared at top level.
    for view in list(registry.views.values()):
        _add(registry, view.entity)
        _add(registry, view.source)
    for service in registry.services.values():
        for view in service.views:
            known = registry.views.get(view.name)
            if known is None:
                _add(registry, view)
            elif known != view:
                raise FeatureDefinitionError(
                    "FeatureService",
                    service.name,
                    "views",
                    f"{view.name!r} differs from the registered view of that name",
                )
        for request in service.request:
            _add(registry, request)
    return registry


def _add(registry: Registry, value: object) -> None:
    groups: list[tuple[type, dict[str, Any], str]] = [
        (FeatureView, registry.views, "FeatureView"),
        (FeatureService, registry.services, "FeatureService"),
        (Entity, registry.entities, "Entity"),
        (EventSource, registry.sources, "EventSource"),
        (RequestFeatures, registry.request_features, "RequestFeatures"),
    ]
    for cls, group, kind in groups:
        if isinstance(value, cls):
            name: str = value.name  # type: ignore[attr-defined]
            existing = group.get(name)
            if existing is not None and existing != value:
                raise FeatureDefinitionError(kind, name, "name", "two different definitions")
            group[name] = value
            return
