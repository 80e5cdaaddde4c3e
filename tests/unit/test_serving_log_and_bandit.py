"""The prediction log's counting and retries (fake producer), and the epsilon-greedy bandit."""

from __future__ import annotations

import random
import time

import pytest

from serving.prediction_log import KafkaLog
from serving.selection import EpsilonGreedy, RecentPredictions
from tests.helpers.serving import FakeProducer


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


def test_failed_deliveries_are_retried_and_counted():
    producer = FakeProducer(failures=3)
    outcomes: list[tuple[str, str]] = []
    log = KafkaLog(
        producer, retries=5, retry_backoff_s=0.001, on_outcome=lambda o, t: outcomes.append((o, t))
    )
    log.start()
    for i in range(10):
        assert log.send("preds", f"k{i}".encode(), b"{}")
    counts = log.close()
    assert (counts.delivered, counts.retried, counts.failed, counts.dropped) == (10, 3, 0, 0)
    assert counts.produced == 13
    assert counts.pending == 0
    assert sorted(m.key() for m in producer.delivered) == sorted(
        f"k{i}".encode() for i in range(10)
    )
    assert outcomes.count(("retried", "preds")) == 3


def test_records_that_keep_failing_are_counted_failed_not_lost_silently(caplog):
    producer = FakeProducer(failures=100)
    log = KafkaLog(producer, retries=2, retry_backoff_s=0.001)
    log.start()
    log.send("preds", b"doomed", b"{}")
    wait_for(lambda: log.counts.failed == 1)
    counts = log.close()
    assert (counts.produced, counts.retried, counts.failed, counts.delivered) == (3, 2, 1, 0)


def test_a_full_queue_drops_and_counts_instead_of_blocking():
    producer = FakeProducer()
    log = KafkaLog(producer, max_queue=3)  # not started: nothing drains the queue
    started = time.perf_counter()
    sent = [log.send("preds", b"k", b"v") for _ in range(5)]
    assert time.perf_counter() - started < 0.1
    assert sent == [True, True, True, False, False]
    assert log.counts.dropped == 2
    log.start()
    counts = log.close()
    assert counts.delivered == 3


def test_epsilon_greedy_prefers_the_lower_error_version_once_it_has_evidence():
    fields: dict[str, float] = {}
    bandit = EpsilonGreedy(
        epsilon=0.0, min_samples=5, read=lambda _ctx: fields, rng=random.Random(1)
    )
    assert bandit.choose([1, 2], default=1) == 1  # no evidence: production
    for _ in range(5):
        fields = bandit.update(fields, [1, 2], {1: 0.2}).applied_to(fields)
        fields = bandit.update(fields, [1, 2], {2: 0.1}).applied_to(fields)
    assert fields == {
        "n:1": 5,
        "loss:1": pytest.approx(1.0),
        "n:2": 5,
        "loss:2": pytest.approx(0.5),
    }
    assert bandit.choose([1, 2], default=1) == 2
    assert bandit.weights([1, 2], default=1) == {1: 0.0, 2: 1.0}
    exploring = EpsilonGreedy(epsilon=1.0, rng=random.Random(2))
    picks = {exploring.choose([1, 2, 3], default=1) for _ in range(100)}
    assert picks == {1, 2, 3}


def test_recent_predictions_forget_the_oldest():
    recent = RecentPredictions(capacity=2)
    for i in range(3):
        recent.add(f"p{i}", "m", 1, float(i))
    assert recent.pop("p0") is None
    assert recent.pop("p2") == ("m", 1, 2.0)
    assert recent.pop("p2") is None  # feedback counts once


def test_fixed_policy_always_answers_with_the_default_version():
    from serving.selection import FixedPolicy

    policy = FixedPolicy()
    assert policy.update({}, [1, 2, 3], {2: 1.0}).add == {}  # losses never move it
    assert {policy.choose([1, 2, 3], 1) for _ in range(50)} == {1}
