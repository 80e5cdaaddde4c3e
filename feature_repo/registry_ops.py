"""Plan and apply the translated definitions against the Feast registry named in settings.

The diff is Feast's own (FeatureStore.plan: validation, inference, then a proto comparison of
each object's spec); apply follows what `feast apply` does for a Redis online store (the legacy
FeatureStore.apply with partial=False: objects no longer declared are deleted, and Feast
clears their online values). Both are idempotent; a second apply changes nothing.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.settings import Settings
from feature_repo.config import feature_store
from feature_repo.definitions import feast_objects
from feature_repo.errors import FeastRegistryError
from feature_repo.offline import settle_placeholders
from features.registry import Registry

Change = Literal["added", "changed", "removed"]
_KINDS = {
    "project": "project",
    "data source": "source",
    "entity": "entity",
    "feature view": "view",
    "feature service": "service",
}
_ORDER = ("project", "entity", "source", "view", "service")


@dataclass(frozen=True)
class FieldChange:
    """One changed property of a Feast object's spec: what is stored -> what is declared."""

    field: str
    old: str
    new: str


@dataclass(frozen=True)
class ObjectChange:
    kind: str  # project, entity, source, view, service
    name: str
    change: Change
    fields: tuple[FieldChange, ...] = ()


def _text(value: Any) -> str:
    from google.protobuf import text_format
    from google.protobuf.duration_pb2 import Duration
    from google.protobuf.message import Message

    if isinstance(value, Duration):
        return str(value.ToTimedelta())
    if isinstance(value, Message):
        return str(text_format.MessageToString(value, as_one_line=True))
    return str(value)


def _items(value: Any) -> list[str] | None:
    """Repeated fields and maps as comparable one-line items; None for a single value."""
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return None
    if hasattr(value, "items"):
        return [f"{k}={_text(v)}" for k, v in sorted(value.items())]
    return [_text(v) for v in value]


def _without_meta(value: Any) -> Any:
    """A copy of a message without its created/updated timestamps, which always differ."""
    from google.protobuf.message import Message

    if not isinstance(value, Message) or "meta" not in value.DESCRIPTOR.fields_by_name:
        return value
    copy = type(value)()
    copy.CopyFrom(value)
    copy.ClearField("meta")
    return copy


def _field_change(name: str, old: Any, new: Any) -> FieldChange | None:
    old, new = _without_meta(old), _without_meta(new)
    if old == new:  # Feast lists a nested source whose only change is its timestamps
        return None
    old_items, new_items = _items(old), _items(new)
    if old_items is None or new_items is None:
        return FieldChange(name, _text(old), _text(new))
    # Lists (features, tags) show only what differs, or a long schema would hide the change.
    removed = [i for i in old_items if i not in new_items]
    added = [i for i in new_items if i not in old_items]
    if not removed and not added:  # same items, another order
        return FieldChange(name, ", ".join(old_items), ", ".join(new_items))
    return FieldChange(name, ", ".join(removed) or "-", ", ".join(added) or "-")


def _changes(registry_diff: Any) -> list[ObjectChange]:
    from feast.diff.property_diff import TransitionType
    from feast.feature_view import DUMMY_ENTITY_NAME

    kinds: dict[Any, Change] = {
        TransitionType.CREATE: "added",
        TransitionType.DELETE: "removed",
        TransitionType.UPDATE: "changed",
    }
    out: list[ObjectChange] = []
    for diff in registry_diff.feast_object_diffs:
        change = kinds.get(diff.transition_type)
        if change is None or diff.name == DUMMY_ENTITY_NAME:  # unchanged, or Feast's own
            continue
        kind = diff.feast_object_type.value
        fields = tuple(
            field
            for p in diff.feast_object_property_diffs
            if (field := _field_change(p.property_name, p.val_existing, p.val_declared))
        )
        out.append(ObjectChange(_KINDS.get(kind, kind), diff.name, change, fields))
    rank = {kind: i for i, kind in enumerate(_ORDER)}
    return sorted(out, key=lambda c: (rank.get(c.kind, len(rank)), c.name))


def _repo_contents(objects: Iterable[Any], project: str) -> Any:
    from feast import Entity, FeatureService, FeatureView, Project
    from feast.data_source import DataSource
    from feast.feature_view import DUMMY_ENTITY
    from feast.repo_contents import RepoContents

    objects = list(objects)
    return RepoContents(
        projects=[Project(name=project)],
        data_sources=[o for o in objects if isinstance(o, DataSource)],
        feature_views=[o for o in objects if isinstance(o, FeatureView)],
        on_demand_feature_views=[],
        stream_feature_views=[],
        label_views=[],
        # Feast adds its placeholder entity on every apply; declaring it keeps it out of diffs.
        entities=[*(o for o in objects if isinstance(o, Entity)), DUMMY_ENTITY],
        feature_services=[o for o in objects if isinstance(o, FeatureService)],
        permissions=[],
    )


def plan(settings: Settings, registry: Registry) -> list[ObjectChange]:
    """What apply would change in the Feast registry (reads it, writes nothing)."""
    if settings.feast_registry.exists():
        return _plan_and_maybe_apply(settings, registry, apply=False)
    # Feast writes an empty registry file when it opens a missing one: diff against a
    # throwaway one instead, so that diff never creates state.
    with tempfile.TemporaryDirectory(prefix="sluice-plan-") as tmp:
        scratch = settings.model_copy(update={"feast_registry": Path(tmp) / "registry.db"})
        return _plan_and_maybe_apply(scratch, registry, apply=False)


def apply(settings: Settings, registry: Registry) -> list[ObjectChange]:
    """Make the Feast registry match the definitions; returns what changed."""
    return _plan_and_maybe_apply(settings, registry, apply=True)


def _plan_and_maybe_apply(
    settings: Settings, registry: Registry, *, apply: bool
) -> list[ObjectChange]:
    from feast.repo_operations import extract_objects_for_apply_delete

    objects = feast_objects(registry, settings)
    # Feast raises many unrelated exception types (ValueError, its own FeastError tree,
    # protobuf and file errors); at this boundary each means "Feast refused", said plainly.
    try:
        store = feature_store(settings)
        repo = _repo_contents(objects, settings.feast_project)
        registry_diff, _, _ = store.plan(repo)
        changes = _changes(registry_diff)
        if apply and changes:
            to_apply, to_delete, _, _ = extract_objects_for_apply_delete(  # type: ignore[no-untyped-call]
                settings.feast_project, store.registry, repo
            )
            store.apply(to_apply, objects_to_delete=to_delete, partial=False)
    except Exception as exc:
        verb = "apply" if apply else "plan"
        raise FeastRegistryError(
            f"Feast could not {verb} the definitions of {registry.module} against the "
            f"registry {settings.feast_registry}: {type(exc).__name__}: {exc}"
        ) from exc
    if apply:
        # Every applied view is readable offline at once, before its first rows exist.
        try:
            settle_placeholders(settings, registry.views.values())
        except OSError as exc:
            raise FeastRegistryError(
                f"cannot write empty offline partitions under {settings.offline_store_dir}: {exc}"
            ) from exc
    return changes


def summary(changes: Sequence[ObjectChange]) -> str:
    counts = {c: sum(1 for x in changes if x.change == c) for c in ("added", "changed", "removed")}
    return ", ".join(f"{n} {c}" for c, n in counts.items())
