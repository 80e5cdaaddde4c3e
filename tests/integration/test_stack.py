"""The local stack for real: idempotent up, status, a Kafka round trip, Redis, and down."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]  # stubs omit it

from core.settings import load_settings
from infra.stack import free_port, stack_down, stack_status, stack_up

pytestmark = pytest.mark.integration


def test_up_is_idempotent(stack_settings):
    before = stack_status(stack_settings)
    again = stack_up(stack_settings)
    assert [s.pid for s in again] == [s.pid for s in before]
    assert all(s.pid is not None for s in again)


def test_status_shows_running(stack_settings):
    statuses = stack_status(stack_settings)
    assert [(s.name, s.state, s.managed) for s in statuses] == [
        ("broker", "running", True),
        ("redis", "running", True),
    ]
    for status in statuses:
        assert status.pid is not None
        assert Path(f"/proc/{status.pid}").exists()
        assert status.log_path is not None
        assert status.log_path.exists()
        assert status.uptime_s is not None
        assert status.uptime_s > 0
    assert statuses[0].address == stack_settings.kafka_bootstrap


def test_kafka_round_trip(stack_settings, kafka_admin):
    topic = f"stack-test-{uuid.uuid4().hex[:8]}"
    kafka_admin.create_topics([NewTopic(topic, num_partitions=2)])[topic].result(timeout=10)
    sent = {f"k{i}".encode(): f"v{i}".encode() for i in range(5)}
    producer = Producer(stack_settings.kafka_client_config())
    for key, value in sent.items():
        producer.produce(topic, key=key, value=value)
    assert producer.flush(10) == 0

    consumer = Consumer(
        stack_settings.kafka_client_config(
            **{
                "group.id": f"g-{topic}",
                "auto.offset.reset": "earliest",
                # Tansu holds a new group's first join for session.timeout.ms / 2.
                "session.timeout.ms": 6000,
            }
        )
    )
    received: dict[bytes, bytes] = {}
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        while len(received) < len(sent) and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                received[message.key() or b""] = message.value() or b""
    finally:
        consumer.close()
    assert received == sent


def test_redis_set_get(stack_settings):
    with redis.Redis.from_url(stack_settings.redis_url) as client:
        key = f"stack-test:{uuid.uuid4().hex}"
        assert client.set(key, "value", ex=60)
        assert client.get(key) == b"value"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_second_stack_down_is_clean_and_idempotent(tmp_path):
    broker_port, redis_port = free_port(), free_port()
    settings = load_settings(
        kafka_bootstrap=f"127.0.0.1:{broker_port}",
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        state_dir=tmp_path,
    )
    up = stack_up(settings)
    try:
        pids = [s.pid for s in up]
        assert [s.state for s in up] == ["running", "running"]
        stopped = stack_down(settings)
        assert [(s.name, s.pid, s.state) for s in stopped] == [
            ("broker", pids[0], "stopped"),
            ("redis", pids[1], "stopped"),
        ]
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists()
        assert _port_free(broker_port)
        assert _port_free(redis_port)
        assert [s.state for s in stack_status(settings)] == ["stopped", "stopped"]
        assert stack_down(settings) == []
        # Restarting at once on the same ports works (Tansu panics if the old one still holds it).
        assert [s.state for s in stack_up(settings)] == ["running", "running"]
    finally:
        stack_down(settings)
