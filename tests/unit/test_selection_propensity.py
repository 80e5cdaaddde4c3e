"""The propensity each prediction is logged with (ModelSlot.pick): the probability the policy
(and the canary split) gave the version that answered, which inverse propensity scoring needs
to evaluate another policy from logged traffic. Checked against the sampling itself."""

from __future__ import annotations

import math
import random
from collections import Counter
from types import SimpleNamespace
from typing import cast

import pytest

from core.records import PredictionRecord
from serving.model import LoadedModel
from serving.selection import EpsilonGreedy, Exp3, FixedPolicy, ModelSlot, SelectionPolicy


def _model(version: int) -> LoadedModel:
    return cast(LoadedModel, SimpleNamespace(name="eta", version=version))


def _slot(policy: SelectionPolicy, versions: list[int], seed: int = 3) -> ModelSlot:
    models = {v: _model(v) for v in versions}
    slot = ModelSlot(models[versions[-1]], policy)
    slot.swap(models[versions[-1]], models)
    slot.rng = random.Random(seed)
    return slot


def _frequencies(slot: ModelSlot, draws: int) -> tuple[Counter[int], dict[int, set[float]]]:
    counts: Counter[int] = Counter()
    logged: dict[int, set[float]] = {}
    for _ in range(draws):
        model, propensity = slot.pick()
        assert propensity is not None
        counts[model.version] += 1
        logged.setdefault(model.version, set()).add(round(propensity, 12))
    return counts, logged


def test_one_version_and_no_canary_is_chosen_with_probability_one():
    assert _slot(FixedPolicy(), [4]).pick()[1] == 1.0


def test_exp3_logs_each_versions_softmax_share_and_samples_by_it():
    fields = {"lw:1": 0.0, "lw:2": math.log(3.0), "lw:3": math.log(6.0)}  # shares 0.1/0.3/0.6
    slot = _slot(Exp3(read=lambda _ctx: fields, rng=random.Random(11)), [1, 2, 3])
    counts, logged = _frequencies(slot, 20_000)
    expected = {1: 0.1, 2: 0.3, 3: 0.6}
    for version, share in expected.items():
        assert len(logged[version]) == 1
        assert logged[version].pop() == pytest.approx(share)
        assert counts[version] / 20_000 == pytest.approx(share, abs=0.015)


def test_canary_share_and_policy_combine_into_one_probability():
    slot = _slot(FixedPolicy(), [1, 2])  # production 2 answers whatever the policy is asked
    canary = _model(5)
    slot.swap(slot.state.production, dict(slot.state.arms), canary=canary, canary_share=0.25)
    counts, logged = _frequencies(slot, 20_000)
    assert set(counts) == {2, 5}
    assert logged == {2: {0.75}, 5: {0.25}}
    assert counts[5] / 20_000 == pytest.approx(0.25, abs=0.015)


def test_epsilon_greedy_explores_every_version_with_its_logged_share():
    fields = {"n:1": 50.0, "loss:1": 5.0, "n:2": 50.0, "loss:2": 25.0}  # 1 is greedy
    policy = EpsilonGreedy(epsilon=0.3, read=lambda _ctx: fields, rng=random.Random(5))
    counts, logged = _frequencies(_slot(policy, [1, 2]), 20_000)
    assert logged == {1: {0.85}, 2: {0.15}}
    assert counts[2] / 20_000 == pytest.approx(0.15, abs=0.015)


def test_the_prediction_record_carries_the_propensity_and_older_records_read_as_none():
    record = PredictionRecord(
        prediction_id="p1",
        time_ms=1,
        model="eta",
        model_version=2,
        prediction=3.5,
        latency_ms=1.0,
        request={},
        features={},
        feature_ages_ms={},
        missing=[],
        stale=[],
        propensity=0.25,
    )
    assert PredictionRecord.decode(record.encode()).propensity == 0.25
    record.propensity = None
    encoded = record.encode()
    assert b"propensity" not in encoded
    assert PredictionRecord.decode(encoded).propensity is None


@pytest.mark.parametrize("policy", ["exp3", "egreedy"])
def test_a_pick_reads_the_policy_state_once(policy):
    """The weights give both the choice and its propensity: computed once per pick (the
    state read behind them, per request, is what a choose + weights pair did twice)."""
    reads: list[str] = []
    fields = {"lw:1": 0.0, "lw:2": 1.0, "n:1": 20.0, "loss:1": 2.0, "n:2": 20.0, "loss:2": 8.0}

    def read(context: str) -> dict[str, float]:
        reads.append(context)
        return fields

    chosen: SelectionPolicy = (
        Exp3(read=read, rng=random.Random(2))
        if policy == "exp3"
        else EpsilonGreedy(0.2, read=read, rng=random.Random(2))
    )
    slot = _slot(chosen, [1, 2])
    for n in range(1, 50):
        model, propensity = slot.pick("zone-1")
        assert propensity == pytest.approx(chosen.weights([1, 2], 2, "zone-1")[model.version])
        assert len(reads) == 2 * n  # one by pick, one by the check's own weights call
    assert set(reads) == {"zone-1"}
