"""Which loaded version answers a request: a model-selection policy among the served versions.

A policy is one class following the SelectionPolicy protocol below: ``choose`` picks the
version for a request (per context value: the value of a declared request field, as Clipper
keeps state per user), ``weights`` says how the policy splits traffic (Exp4: the ensemble's
weights), and ``update`` turns losses into a StateUpdate of the shared state
(serving/policy_state.py: Redis, shared by all replicas). Policies read state through a
``StateReader`` (context -> fields, served from a cache) and never write it: the feedback
consumer (serving/feedback.py) joins labels with predictions, computes the loss and applies
the update. Losses are normalized to [0, 1]: ``loss_of`` below.

- FixedPolicy: the production version, always.
- EpsilonGreedy: with probability epsilon a random arm, else the arm with the lowest mean loss
  among arms with at least ``min_samples`` losses, else production.
- Exp3 (Clipper, Crankshaw et al. NSDI 2017, section 5.1): p_i = w_i / sum w (mixed with
  ``gamma`` / K of uniform exploration when gamma > 0), the chosen arm's weight is updated
  w_i <- w_i * exp(-eta * loss / p_i). Kept as log-weights (no overflow or underflow; the
  probabilities come from a max-shifted softmax); one update moves a log-weight by at most
  MAX_STEP so that a rare arm's 1/p cannot write absurd numbers. An arm without state (a new
  version) enters at the mean weight of the others (log-mean-exp of their log-weights).
- Exp4: every arm predicts, the answer is the mean of their predictions weighted by
  w_i / sum w, and each arm is updated by its own loss: w_i <- w_i * exp(-eta * loss_i) (no
  importance weighting: every arm's loss is observed).

A slot's state (production model, arms) is one immutable object replaced by a single
assignment, so a promote is atomic for readers: a request sees the old state or the new one,
never a mix, and requests already queued keep the model they were given.
"""

from __future__ import annotations

import math
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from serving.model import LoadedModel

StateReader = Callable[[str], Mapping[str, float]]  # context value -> the state's fields
MAX_STEP = 50.0  # the most one update moves a log-weight (exp(-50) ~ 2e-22)
# A label judges a choice made seconds ago: the arm's probability may have underflowed since.
_TINY = 1e-300


def loss_of(label: float, prediction: float, scale: float) -> float:
    """|label - prediction| / scale, clipped to [0, 1] (an error of ``scale`` or more is 1)."""
    return min(1.0, abs(label - prediction) / scale)


@dataclass(frozen=True)
class StateUpdate:
    """What one observation changes: fields created if absent, then increments."""

    init: dict[str, float] = field(default_factory=dict)
    add: dict[str, float] = field(default_factory=dict)

    def applied_to(self, fields: Mapping[str, float]) -> dict[str, float]:
        out = dict(fields)
        for name, value in self.init.items():
            out.setdefault(name, value)
        for name, value in self.add.items():
            out[name] = out.get(name, 0.0) + value
        return out


class SelectionPolicy(Protocol):
    kind: ClassVar[str]  # names the state (a policy never reads another kind's numbers)

    def choose(self, versions: Sequence[int], default: int, context: str = "") -> int: ...

    def weights(self, versions: Sequence[int], default: int, context: str = "") -> dict[int, float]:
        """Each version's share of traffic (Exp4: of the ensemble's answer); sums to 1."""
        ...

    def update(
        self, fields: Mapping[str, float], versions: Sequence[int], losses: Mapping[int, float]
    ) -> StateUpdate:
        """The state change for losses in [0, 1] observed for these versions."""
        ...


def _no_state(_context: str) -> Mapping[str, float]:
    return {}


@dataclass
class FixedPolicy:
    """Always the default (production) version; losses change nothing."""

    kind: ClassVar[str] = "fixed"

    def choose(self, versions: Sequence[int], default: int, context: str = "") -> int:
        return default

    def weights(self, versions: Sequence[int], default: int, context: str = "") -> dict[int, float]:
        return {v: float(v == default) for v in versions}

    def update(
        self, fields: Mapping[str, float], versions: Sequence[int], losses: Mapping[int, float]
    ) -> StateUpdate:
        return StateUpdate()


@dataclass
class EpsilonGreedy:
    epsilon: float
    min_samples: int = 10
    read: StateReader = _no_state
    rng: random.Random = field(default_factory=random.Random)
    kind: ClassVar[str] = "egreedy"

    def _best(self, fields: Mapping[str, float], versions: Sequence[int]) -> int | None:
        ready = [v for v in versions if fields.get(f"n:{v}", 0.0) >= self.min_samples]
        if not ready:
            return None
        return min(ready, key=lambda v: fields[f"loss:{v}"] / fields[f"n:{v}"])

    def choose(self, versions: Sequence[int], default: int, context: str = "") -> int:
        if self.rng.random() < self.epsilon:
            return self.rng.choice(list(versions))
        best = self._best(self.read(context), versions)
        return default if best is None else best

    def weights(self, versions: Sequence[int], default: int, context: str = "") -> dict[int, float]:
        best = self._best(self.read(context), versions)
        greedy = default if best is None else best
        share = self.epsilon / len(versions)
        return {v: share + (1 - self.epsilon) * (v == greedy) for v in versions}

    def update(
        self, fields: Mapping[str, float], versions: Sequence[int], losses: Mapping[int, float]
    ) -> StateUpdate:
        add: dict[str, float] = {}
        for version, loss in losses.items():
            add[f"n:{version}"] = add.get(f"n:{version}", 0.0) + 1
            add[f"loss:{version}"] = add.get(f"loss:{version}", 0.0) + loss
        return StateUpdate(add=add)


def log_weights(fields: Mapping[str, float], versions: Sequence[int]) -> dict[int, float]:
    """Each version's log-weight; a version without one gets the mean weight of the others."""
    known = {v: fields[f"lw:{v}"] for v in versions if f"lw:{v}" in fields}
    if not known:
        return {v: 0.0 for v in versions}
    top = max(known.values())
    mean = top + math.log(sum(math.exp(x - top) for x in known.values()) / len(known))
    return {v: known.get(v, mean) for v in versions}


def softmax(log_w: Mapping[int, float], gamma: float = 0.0) -> dict[int, float]:
    """w_i / sum w from log-weights (max-shifted), mixed with gamma of uniform exploration."""
    top = max(log_w.values())
    exps = {v: math.exp(x - top) for v, x in log_w.items()}
    total = sum(exps.values())
    uniform = gamma / len(log_w)
    return {v: (1 - gamma) * e / total + uniform for v, e in exps.items()}


def _initial(fields: Mapping[str, float], log_w: Mapping[int, float]) -> dict[str, float]:
    """New arms enter at the mean weight: written only if still absent (HSETNX)."""
    return {f"lw:{v}": x for v, x in log_w.items() if f"lw:{v}" not in fields}


@dataclass
class Exp3:
    eta: float = 0.1
    gamma: float = 0.0
    read: StateReader = _no_state
    rng: random.Random = field(default_factory=random.Random)
    kind: ClassVar[str] = "exp3"

    def weights(self, versions: Sequence[int], default: int, context: str = "") -> dict[int, float]:
        return softmax(log_weights(self.read(context), versions), self.gamma)

    def choose(self, versions: Sequence[int], default: int, context: str = "") -> int:
        p = self.weights(versions, default, context)
        pick = self.rng.random()
        for version in versions:
            pick -= p[version]
            if pick < 0:
                return version
        return versions[-1]  # rounding: the probabilities sum to 1 - tiny

    def update(
        self, fields: Mapping[str, float], versions: Sequence[int], losses: Mapping[int, float]
    ) -> StateUpdate:
        log_w = log_weights(fields, versions)
        p = softmax(log_w, self.gamma)
        add = {
            f"lw:{v}": -min(MAX_STEP, self.eta * loss / max(p[v], _TINY))
            for v, loss in losses.items()
            if v in p
        }
        return StateUpdate(_initial(fields, log_w), add)


@dataclass
class Exp4:
    eta: float = 0.1
    read: StateReader = _no_state
    kind: ClassVar[str] = "exp4"

    def weights(self, versions: Sequence[int], default: int, context: str = "") -> dict[int, float]:
        return softmax(log_weights(self.read(context), versions))

    def choose(self, versions: Sequence[int], default: int, context: str = "") -> int:
        return default  # every arm predicts (serving/ensemble.py); production carries the row

    def update(
        self, fields: Mapping[str, float], versions: Sequence[int], losses: Mapping[int, float]
    ) -> StateUpdate:
        log_w = log_weights(fields, versions)
        add = {
            f"lw:{v}": -min(MAX_STEP, self.eta * loss) for v, loss in losses.items() if v in log_w
        }
        return StateUpdate(_initial(fields, log_w), add)


@dataclass(frozen=True)
class SlotState:
    production: LoadedModel
    arms: Mapping[int, LoadedModel]  # includes production
    # Rollout (serving/rollout.py): the canary answers canary_share of requests before any
    # policy is asked; shadows predict on every request too, never answer.
    canary: LoadedModel | None = None
    canary_share: float = 0.0
    shadows: tuple[LoadedModel, ...] = ()


class ModelSlot:
    """The served versions of one model name."""

    def __init__(self, production: LoadedModel, policy: SelectionPolicy | None = None) -> None:
        self.name = production.name
        self.policy: SelectionPolicy = policy or FixedPolicy()
        self.state = SlotState(production, {production.version: production})
        self.rng = random.Random()

    def choose(self, context: str = "", state: SlotState | None = None) -> LoadedModel:
        return self.pick(context, state)[0]

    def pick(
        self, context: str = "", state: SlotState | None = None
    ) -> tuple[LoadedModel, float | None]:
        """The version that answers, and the probability it had of being chosen (the
        propensity the prediction log carries, so that a policy can be evaluated off-policy
        from logged traffic: inverse propensity scoring). None for Exp4, whose answer is the
        ensemble's, not one version's."""
        state = state or self.state  # one read: the whole choice uses one state
        canary = state.canary
        if canary is None and len(state.arms) == 1:
            return state.production, 1.0  # the common case, on every request: no choice
        share = state.canary_share if canary is not None else 0.0
        exp4 = self.policy.kind == "exp4"  # its weights are the ensemble's, not a choice's
        versions = sorted(state.arms)
        if canary is not None and self.rng.random() < share:
            model = canary
            if exp4:
                return model, None
            # The canary may be an arm too: the policy could have chosen it as well.
            in_arms = model.version in state.arms
            p_policy = self._weights(state, versions, context) if in_arms else {}
        elif exp4:
            return state.arms[self.policy.choose(versions, state.production.version, context)], None
        else:
            # The weights are the policy's choice distribution: computed once and sampled
            # (the policy's own choose would compute them again).
            p_policy = self._weights(state, versions, context)
            rng = getattr(self.policy, "rng", self.rng)
            model = state.arms[_sample(p_policy, versions, rng)]
        canary_p = share if canary is not None and model.version == canary.version else 0.0
        return model, canary_p + (1.0 - share) * p_policy.get(model.version, 0.0)

    def _weights(self, state: SlotState, versions: list[int], context: str) -> Mapping[int, float]:
        if len(versions) == 1:
            return {state.production.version: 1.0}
        return self.policy.weights(versions, state.production.version, context)

    def swap(
        self,
        production: LoadedModel,
        others: Mapping[int, LoadedModel] | None = None,
        *,
        canary: LoadedModel | None = None,
        canary_share: float = 0.0,
        shadows: tuple[LoadedModel, ...] = (),
    ) -> None:
        arms = {**(others or {}), production.version: production}
        self.state = SlotState(production, arms, canary, canary_share, shadows)

    def models(self) -> dict[int, LoadedModel]:
        """Every version the state serves, answering or shadowing."""
        state = self.state
        extra = [state.canary] if state.canary is not None else []
        return {m.version: m for m in (*state.arms.values(), *extra, *state.shadows)}


def _sample(p: Mapping[int, float], versions: Sequence[int], rng: random.Random) -> int:
    """A version drawn with probability p[version]."""
    pick = rng.random()
    for version in versions:
        pick -= p.get(version, 0.0)
        if pick < 0:
            return version
    return versions[-1]  # rounding: the probabilities sum to 1 - tiny


class RecentPredictions:
    """prediction id -> (model, version, prediction) for /feedback's answer; the oldest are
    forgotten."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[str, int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, prediction_id: str, model: str, version: int, value: float) -> None:
        with self._lock:
            self._items[prediction_id] = (model, version, value)
            if len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def pop(self, prediction_id: str) -> tuple[str, int, float] | None:
        with self._lock:
            return self._items.pop(prediction_id, None)
