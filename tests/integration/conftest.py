"""Session fixtures for integration tests: one real local stack (Tansu broker, Redis) on free
loopback ports, started once and stopped at the end. Tests mark themselves as integration."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from core.settings import Settings, load_settings
from infra.stack import free_port, stack_down, stack_up


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = load_settings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        state_dir=tmp_path_factory.mktemp("stack"),
    )
    stack_up(settings)
    try:
        yield settings
    finally:
        stack_down(settings)


@pytest.fixture(scope="session")
def kafka_admin(stack_settings: Settings) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient(stack_settings.kafka_client_config())


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    """One local SparkSession for the whole run: starting one costs 6-16 s."""
    from batch.session import spark_session, stop_session

    session = spark_session(load_settings(spark_master="local[2]"))
    try:
        yield session
    finally:
        stop_session()


@pytest.fixture(autouse=True)
def _no_inherited_pyflink_gateway_flag() -> None:
    """PyFlink runs a local job's Python functions inside the driver process and leaves
    PYFLINK_GATEWAY_DISABLED set there afterwards; a `sluice stream` subprocess started later
    by another test would inherit it and refuse to start its own gateway."""
    os.environ.pop("PYFLINK_GATEWAY_DISABLED", None)
