"""`sluice features diff | apply` against a real Feast registry, and the bare `feast apply` run in
feature_repo/ with the environment `sluice features env` gives (Redis from the stack fixture)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from feature_repo import registry_ops
from feature_repo.config import REPO_DIR, feast_env, feature_store
from features.registry import load_registry

pytestmark = pytest.mark.integration
FEAST = str(Path(sys.executable).parent / "feast")


@pytest.fixture
def modules(tmp_path: Path) -> Iterator[Path]:
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))


def write_module(directory: Path, body: str) -> str:
    name = f"defs_{uuid.uuid4().hex[:8]}"
    (directory / f"{name}.py").write_text(textwrap.dedent(body))
    return name


TTL_CHANGED = """
    from datetime import timedelta

    from examples.delivery import features as base

    restaurant_orders = base.restaurant_orders.model_copy(update={"ttl": timedelta(hours=3)})
    zone_couriers = base.zone_couriers
    restaurant_prep = base.restaurant_prep
    delivery_eta = base.delivery_eta.model_copy(
        update={"views": (restaurant_orders, zone_couriers, restaurant_prep)}
    )
    delivery_eta_batch_only = base.delivery_eta_batch_only
"""
ZONES_DROPPED = """
    from examples.delivery import features as base

    restaurant_orders = base.restaurant_orders
    restaurant_prep = base.restaurant_prep
    delivery_eta_batch_only = base.delivery_eta_batch_only
"""


def rows(output: str) -> set[tuple[str, ...]]:
    """The cells of every table row: (change, kind, name, field, stored, declared)."""
    return {
        tuple(cell.strip() for cell in line.split("│")[1:-1])
        for line in output.splitlines()
        if line.startswith("│")
    }


def test_diff_apply_diff_then_a_changed_ttl_and_a_removal(stack_settings, tmp_path, modules):
    settings = stack_settings.model_copy(
        update={
            "feast_project": "cli_test",
            "feast_registry": tmp_path / "registry.db",
            "offline_store_dir": tmp_path / "offline",
        }
    )
    env = {
        "COLUMNS": "250",
        "SLUICE_CONFIG": "",
        "SLUICE_REDIS_URL": settings.redis_url,
        "SLUICE_FEAST_PROJECT": settings.feast_project,
        "SLUICE_FEAST_REGISTRY": str(settings.feast_registry),
        "SLUICE_OFFLINE_STORE_DIR": str(settings.offline_store_dir),
    }
    runner = CliRunner()

    def sluice(*args: str, expect: int = 0) -> str:
        result = runner.invoke(app, ["features", *args], env=env)
        assert result.exit_code == expect, result.output
        return result.output

    first = sluice("diff")
    added = {(r[1], r[2]) for r in rows(first) if r[0] == "added"}
    assert added == {
        ("project", "cli_test"),
        ("entity", "restaurant"),
        ("entity", "zone"),
        ("source", "restaurant_orders_offline"),
        ("source", "zone_couriers_offline"),
        ("source", "restaurant_prep_offline"),
        ("source", "order_request"),
        ("view", "restaurant_orders"),
        ("view", "zone_couriers"),
        ("view", "restaurant_prep"),
        ("service", "delivery_eta"),
        ("service", "delivery_eta_batch_only"),
    }
    assert "12 added, 0 changed, 0 removed (not applied)" in first
    assert not (tmp_path / "registry.db").exists()  # diff writes nothing
    sluice("diff", "--exit-code", expect=1)

    assert "applied: 12 added" in sluice("apply")
    assert "no changes" in sluice("diff")
    assert "nothing to apply" in sluice("apply")  # idempotent
    sluice("diff", "--exit-code")

    ttl_module = write_module(modules, TTL_CHANGED)
    changed = rows(sluice("diff", "--module", ttl_module))
    assert ("changed", "view", "restaurant_orders", "ttl", "2:00:00", "3:00:00") in changed
    assert {r[:3] for r in changed} == {("changed", "view", "restaurant_orders")}

    dropped_module = write_module(modules, ZONES_DROPPED)
    dropped = {r[:3] for r in rows(sluice("diff", "--module", dropped_module))}
    # order_request stays: delivery_eta_batch_only still reads it.
    assert dropped == {
        ("removed", "entity", "zone"),
        ("removed", "source", "zone_couriers_offline"),
        ("removed", "view", "zone_couriers"),
        ("removed", "service", "delivery_eta"),
    }

    assert "applied: 0 added, 1 changed" in sluice("apply", "--module", ttl_module)
    view = feature_store(settings).get_feature_view("restaurant_orders")
    assert view.ttl == timedelta(hours=3)


def test_bare_feast_apply_in_feature_repo_matches_sluice_apply(stack_settings, tmp_path):
    settings = stack_settings.model_copy(
        update={
            "feast_project": "feast_cli_test",
            "feast_registry": tmp_path / "registry.db",
            "offline_store_dir": tmp_path / "offline",
        }
    )
    env = os.environ | feast_env(settings)
    proc = subprocess.run(
        [FEAST, "apply"], cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    store = feature_store(settings)
    assert {v.name for v in store.list_feature_views()} == {
        "restaurant_orders",
        "zone_couriers",
        "restaurant_prep",
    }
    assert {s.name for s in store.list_feature_services()} == {
        "delivery_eta",
        "delivery_eta_batch_only",
    }
    # The CLI read feature_store.yaml and imported definitions.py; our code builds the same.
    assert registry_ops.plan(settings, load_registry(settings.definitions_module)) == []
