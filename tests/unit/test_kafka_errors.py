"""A broker that does not answer is a typed error naming the setting, not a librdkafka trace."""

from __future__ import annotations

import pytest

from core.errors import BrokerUnreachableError
from core.kafka import ensure_topics
from core.settings import load_settings
from infra.stack import free_port


def test_unreachable_broker_names_the_setting():
    settings = load_settings(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    with pytest.raises(BrokerUnreachableError, match=r"kafka_bootstrap.*sluice up") as caught:
        ensure_topics(settings, ["events.orders"], timeout_s=1)
    assert settings.kafka_bootstrap in str(caught.value)
    assert caught.value.exit_code == 3
