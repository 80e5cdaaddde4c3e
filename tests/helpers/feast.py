"""Integration tests' Feast set-up: a project of their own, the example definitions applied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.settings import Settings


def feast_settings(base: Settings, tmp: Path, project: str, **updates: Any) -> Settings:
    """``base`` with a Feast project of its own (registry and offline store under ``tmp``), the
    example definitions applied to its registry."""
    from feature_repo import registry_ops
    from features.registry import load_registry

    settings = base.model_copy(
        update={
            "feast_project": project,
            "feast_registry": tmp / "registry.db",
            "offline_store_dir": tmp / "offline",
            **updates,
        }
    )
    registry_ops.apply(settings, load_registry(settings.definitions_module))
    return settings
