"""The epsilon-greedy bandit and the recent predictions feedback is matched against (the
prediction log's tests: test_serving_wal.py)."""

from __future__ import annotations

import random

import pytest

from serving.selection import EpsilonGreedy, RecentPredictions


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
