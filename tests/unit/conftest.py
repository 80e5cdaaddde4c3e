"""Fixtures of the unit tests (no broker, Redis, Spark or Flink)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from core.uris import S3Options


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


@pytest.fixture(scope="module")
def s3_store() -> Iterator[S3Options]:
    """moto's S3 server in a thread: a real HTTP endpoint for pyarrow's S3 client."""
    from moto.server import ThreadedMotoServer

    from core.uris import S3Options
    from infra.stack import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield S3Options(f"http://127.0.0.1:{port}", "test-key", "test-secret")
    finally:
        server.stop()
