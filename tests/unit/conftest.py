"""Fixtures of the unit tests (no broker, Redis, Spark or Flink)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _rollout_notices_in_process() -> Iterator[None]:
    """Predictors built here publish rollout notices in process: a unit test has no Redis
    (and must not reach one that happens to listen on the default port). Session-scoped so
    that module-scoped apps see it too; restored for whatever runs after."""
    before = os.environ.get("SLUICE_ROLLOUT_BUS")
    os.environ["SLUICE_ROLLOUT_BUS"] = "local"
    yield
    if before is None:
        os.environ.pop("SLUICE_ROLLOUT_BUS", None)
    else:
        os.environ["SLUICE_ROLLOUT_BUS"] = before
