"""Collecting definitions from a module into one checked registry.

A definitions module declares Entity, EventSource, FeatureView, BatchFeatureView,
RequestFeatures, FeatureService and Labels (features/labels.py) objects at top level (like a
Feast repo's Python files). Loading it imports the module, gathers those objects, and checks what
single definitions cannot check alone: unique names, services that read only registered views,
and labels whose entities and services exist and supply what each service reads.

A definitions module is a domain: besides definitions it may offer hooks, plain callables that
the CLI looks up by name (``domain_hook``): ``produce`` (synthetic events for `sluice produce`)
and ``demo`` (`sluice demo`). The product never imports a domain by any other way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from features.definitions import Entity, FeatureService, FeatureView, RequestFeatures
from features.errors import FeatureDefinitionError
from features.labels import Labels, check_labels
from features.schema import EventSource


@dataclass(frozen=True)
class Registry:
    module: str
    entities: dict[str, Entity] = field(default_factory=dict)
    sources: dict[str, EventSource] = field(default_factory=dict)
    views: dict[str, FeatureView] = field(default_factory=dict)
    request_features: dict[str, RequestFeatures] = field(default_factory=dict)
    services: dict[str, FeatureService] = field(default_factory=dict)
    labels: dict[str, Labels] = field(default_factory=dict)

    def labels_of(self, service: str) -> Labels | None:
        """The label declaration that trains a service, if any."""
        for labels in self.labels.values():
            if service in labels.services:
                return labels
        return None

    def names(self) -> dict[str, str]:
        """Every definition name -> its kind."""
        out: dict[str, str] = {}
        for kind, group in (
            ("entity", self.entities),
            ("source", self.sources),
            ("view", self.views),
            ("request", self.request_features),
            ("service", self.services),
            ("labels", self.labels),
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
            self.labels,
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
    trained_by: dict[str, str] = {}
    for labels in registry.labels.values():
        for source in (labels.source, *(join.source for join in labels.joins)):
            _add(registry, source)
        check_labels(labels, registry.entities, registry.services)
        for name in labels.services:
            if name in trained_by:
                raise FeatureDefinitionError(
                    "Labels",
                    labels.name,
                    "services",
                    f"{name!r} is trained on labels {trained_by[name]!r} already",
                )
            trained_by[name] = labels.name
    return registry


def domain_hook(module_name: str, name: str) -> Callable[..., Any] | None:
    """A callable the definitions module offers under ``name`` (e.g. ``produce``), or None."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise FeatureDefinitionError("module", module_name, "import", str(exc)) from None
    hook = getattr(module, name, None)
    return hook if callable(hook) else None


def _add(registry: Registry, value: object) -> None:
    groups: list[tuple[type, dict[str, Any], str]] = [
        (FeatureView, registry.views, "FeatureView"),
        (FeatureService, registry.services, "FeatureService"),
        (Entity, registry.entities, "Entity"),
        (EventSource, registry.sources, "EventSource"),
        (RequestFeatures, registry.request_features, "RequestFeatures"),
        (Labels, registry.labels, "Labels"),
    ]
    for cls, group, kind in groups:
        if isinstance(value, cls):
            name: str = value.name  # type: ignore[attr-defined]
            existing = group.get(name)
            if existing is not None and existing != value:
                raise FeatureDefinitionError(kind, name, "name", "two different definitions")
            group[name] = value
            return
