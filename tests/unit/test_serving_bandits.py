"""Exp3 and Exp4 math (deterministic rng), the policy state store and its cache, the
label join (by prediction id, by entity and time) and the policy updater."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from core.records import PredictionRecord
from examples.delivery.features import ENTITIES, delivery_times
from serving.feedback import PolicyUpdater
from serving.feedback_join import FeedbackJoin, LabelSource, Match, Pending
from serving.policy_state import CachedPolicyState, MemoryPolicyStore, state_key
from serving.selection import (
    MAX_STEP,
    Exp3,
    Exp4,
    log_weights,
    loss_of,
    softmax,
)


def test_loss_is_the_error_over_the_scale_clipped_to_one():
    assert loss_of(660.0, 600.0, 600.0) == pytest.approx(0.1)
    assert loss_of(0.0, 5000.0, 600.0) == 1.0


def test_exp3_update_is_clippers_rule_in_log_space():
    policy = Exp3(eta=0.5)
    fields = {"lw:1": 0.0, "lw:2": math.log(3.0)}  # w = 1, 3: p = 0.25, 0.75
    update = policy.update(fields, [1, 2], {1: 0.4})
    # w_1 <- w_1 * exp(-eta * loss / p_1) = exp(-0.5 * 0.4 / 0.25)
    assert update.add == {"lw:1": pytest.approx(-0.8)}
    assert update.init == {}
    after = update.applied_to(fields)
    p = softmax(log_weights(after, [1, 2]))
    w1, w2 = math.exp(-0.8), 3.0
    assert p[1] == pytest.approx(w1 / (w1 + w2))


def test_exp3_new_arm_enters_at_the_mean_weight_and_steps_are_bounded():
    policy = Exp3(eta=1.0)
    fields = {"lw:1": math.log(1.0), "lw:2": math.log(3.0)}
    update = policy.update(fields, [1, 2, 3], {})
    assert update.init == {"lw:3": pytest.approx(math.log(2.0))}  # mean of w = 1 and 3
    tiny = {"lw:1": 0.0, "lw:2": -500.0}  # p_2 ~ e^-500: 1/p would be astronomic
    assert policy.update(tiny, [1, 2], {2: 1.0}).add == {"lw:2": -MAX_STEP}
    assert softmax({1: -1e6, 2: -1e6 - 1}) == pytest.approx(
        {1: 1 / (1 + math.exp(-1)), 2: math.exp(-1) / (1 + math.exp(-1))}
    )


def test_exp3_choice_follows_the_probabilities_and_exploration_floor():
    fields = {"lw:1": 0.0, "lw:2": math.log(4.0)}
    policy = Exp3(read=lambda _ctx: fields, rng=random.Random(7))
    picks = [policy.choose([1, 2], default=1) for _ in range(4000)]
    assert picks.count(2) / len(picks) == pytest.approx(0.8, abs=0.03)
    greedy = {"lw:1": 0.0, "lw:2": -1000.0}
    exploring = Exp3(gamma=0.2, read=lambda _ctx: greedy)
    assert exploring.weights([1, 2], 1)[2] == pytest.approx(0.1)  # gamma / K


def test_exp3_learns_the_best_of_three_arms_from_losses():
    rng = random.Random(3)
    fields: dict[str, float] = {}
    policy = Exp3(eta=0.2, read=lambda _ctx: fields, rng=rng)
    mean_loss = {1: 0.5, 2: 0.1, 3: 0.3}
    for _ in range(300):
        chosen = policy.choose([1, 2, 3], default=1)
        loss = min(1.0, max(0.0, rng.gauss(mean_loss[chosen], 0.05)))
        fields = policy.update(fields, [1, 2, 3], {chosen: loss}).applied_to(fields)
    assert policy.weights([1, 2, 3], 1)[2] > 0.9


def test_exp4_updates_every_arm_by_its_own_loss_and_weights_answers():
    policy = Exp4(eta=0.5)
    update = policy.update({}, [1, 2], {1: 0.2, 2: 0.6})
    assert update.init == {"lw:1": 0.0, "lw:2": 0.0}
    assert update.add == {"lw:1": pytest.approx(-0.1), "lw:2": pytest.approx(-0.3)}
    after = update.applied_to({})
    reading = Exp4(read=lambda _ctx: after)
    weights = reading.weights([1, 2], 1)
    assert weights[1] == pytest.approx(math.exp(-0.1) / (math.exp(-0.1) + math.exp(-0.3)))
    assert reading.choose([1, 2], default=1) == 1  # the ensemble answers, production carries


def test_state_store_applies_init_once_and_sums_increments():
    store = MemoryPolicyStore()
    store.apply("k", {"lw:1": -1.0}, {"lw:1": -0.5})
    store.apply("k", {"lw:1": 7.0}, {"lw:1": -0.5})  # init is HSETNX: ignored now
    assert store.read_many(["k", "other"]) == [{"lw:1": -2.0}, {}]


def test_cached_state_reads_a_new_key_once_then_serves_the_copy_until_refresh():
    store = MemoryPolicyStore()
    store.apply(state_key("m", "exp3", "z1"), {}, {"lw:1": -1.0})
    cache = CachedPolicyState(store, refresh_s=60)
    key = state_key("m", "exp3", "z1")
    assert cache.get(key) == {"lw:1": -1.0}
    reads = store.reads
    store.apply(key, {}, {"lw:1": -1.0})
    assert cache.get(key) == {"lw:1": -1.0}
    assert store.reads == reads
    cache.refresh()
    assert cache.get(key) == {"lw:1": -2.0}


def record(pid: str, t: int, version: int = 1, prediction: float = 600.0, **request) -> bytes:
    return PredictionRecord(
        prediction_id=pid,
        time_ms=t,
        model="delivery_eta",
        model_version=version,
        prediction=prediction,
        latency_ms=1.0,
        request={"restaurant_id": "r1", "zone_id": "z1", **request},
        features={},
        feature_ages_ms={},
        missing=[],
        stale=[],
        as_of_ms=t,
    ).encode()


@pytest.fixture
def join() -> FeedbackJoin:
    source = LabelSource.of(delivery_times, {e.name: e for e in ENTITIES})
    return FeedbackJoin(
        [source],
        {"delivery_eta": "delivery_eta"},
        context_field="zone_id",
        horizon_ms=10_000,
        match_ms=1_000,
        label_wait_ms=2_000,
    )


def test_label_joins_by_prediction_id_once_even_if_it_came_first(join):
    assert join.label_by_id("p1", 650.0, now_ms=0) == []  # the prediction is not read yet
    join.add_prediction(PredictionRecord.decode(record("p1", 100)), now_ms=100)
    (match,) = join.retry()
    assert (match.pending.version, match.pending.context, match.label) == (1, "z1", 650.0)
    assert join.label_by_id("p1", 650.0, now_ms=200) == []  # labelled already
    join.expire(now_ms=5_000)
    assert join.counts.as_dict() | {} == {
        "predictions": 1,
        "labels": 2,
        "matched": 1,
        "unmatched": 1,
        "expired": 0,
        "evicted": 0,
        "invalid": 0,
    }


def delivery(t: int, seconds: float, restaurant: str = "r1") -> dict[str, object]:
    return {
        "order_id": "o1",
        "restaurant_id": restaurant,
        "zone_id": "z1",
        "delivery_seconds": seconds,
        "placed_at": t,
        "delivered_at": t + 1_800_000,
    }


def test_label_event_joins_the_nearest_prediction_of_its_entities_within_the_window(join):
    source = join.sources[0]
    for pid, t in (("a", 1_000), ("b", 1_400), ("c", 9_000)):
        join.add_prediction(PredictionRecord.decode(record(pid, t)), now_ms=t)
    (match,) = join.label_event(source, delivery(1_350, 700.0), now_ms=9_000)
    assert match.pending.prediction_id == "b"
    (match,) = join.label_event(source, delivery(1_350, 710.0), now_ms=9_000)
    assert match.pending.prediction_id == "a"  # b is labelled: the next nearest
    assert join.label_event(source, delivery(5_000, 1.0), now_ms=9_000) == []  # none near
    assert join.label_event(source, delivery(9_000, 1.0, restaurant="r2"), now_ms=9_000) == []
    assert join.label_event(source, {"restaurant_id": "r1"}, now_ms=9_000) == []
    join.expire(now_ms=12_000)  # labels waited 2 s; "c" (t 9 s) is inside the 10 s horizon
    assert (join.counts.unmatched, join.counts.invalid, join.counts.expired) == (2, 1, 0)
    join.expire(now_ms=20_000)
    assert join.counts.expired == 1
    assert join.buffered == 0


def test_updater_applies_losses_to_the_shared_state_per_context():
    from serving.selection import ModelSlot

    class Arm:
        def __init__(self, version: int) -> None:
            self.version = version
            self.name = "delivery_eta"

    store = MemoryPolicyStore()
    cache = CachedPolicyState(store)
    slot = ModelSlot.__new__(ModelSlot)
    slot.name = "delivery_eta"
    slot.policy = Exp3(eta=0.5, read=lambda ctx: cache.get(state_key("delivery_eta", "exp3", ctx)))
    from serving.selection import SlotState

    arms: Any = {1: Arm(1), 2: Arm(2)}  # what the updater reads of a model: its version
    slot.state = SlotState(arms[1], arms)
    updater = PolicyUpdater(lambda: {"delivery_eta": slot}, cache, scale=100.0)
    pending = [Pending(f"p{i}", "delivery_eta", 2, 500.0, i, "z1", None) for i in range(2)]
    updater.apply([Match(pending[0], 550.0), Match(pending[1], 550.0)])
    fields = store.hashes[state_key("delivery_eta", "exp3", "z1")]
    # First loss 0.5 at p = 1/2 moves lw:2 by -0.5; the second sees p_2 = e^-0.5 / (1 + e^-0.5)
    p2 = math.exp(-0.5) / (1 + math.exp(-0.5))
    assert fields == {"lw:1": 0.0, "lw:2": pytest.approx(-0.5 - 0.25 / p2)}
    assert cache.get(state_key("delivery_eta", "exp3", "z1")) == fields  # refreshed at once
    stale = Pending("p9", "delivery_eta", 7, 500.0, 0, "z1", None)  # version 7 is not served
    updater.apply([Match(stale, 1.0)])
    assert (updater.applied, updater.stale) == (2, 1)
