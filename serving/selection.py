"""Which loaded version answers a request: a model-selection policy among the served versions.

A new policy (Exp3, Exp4, contextual...) is one class with ``choose`` and ``reward`` (the
SelectionPolicy protocol below); the predictor builds one per model name and feeds it rewards.

A slot's state (production model, arms, bandit) is one immutable object replaced by a single
assignment, so a promote is atomic for readers: a request sees the old state or the new one,
never a mix, and requests already queued keep the model they were given.

Bandit (off unless settings.bandit_epsilon > 0): with probability epsilon a random arm, else
the arm with the best mean reward among arms with at least ``min_samples`` rewards, else
production. Reward is -|label - prediction| from /feedback, so the arm with the lowest mean
absolute error wins.
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from serving.model import LoadedModel


class SelectionPolicy(Protocol):
    """Chooses the version that answers a request and learns from rewards (higher is better)."""

    def choose(self, versions: list[int], default: int) -> int: ...

    def reward(self, version: int, value: float) -> None: ...


@dataclass
class FixedPolicy:
    """Always the default (production) version; rewards are ignored."""

    def choose(self, versions: list[int], default: int) -> int:
        return default

    def reward(self, version: int, value: float) -> None:
        return None


@dataclass
class ArmStats:
    n: int = 0
    total: float = 0.0

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("-inf")


@dataclass
class EpsilonGreedy:
    epsilon: float
    min_samples: int = 10
    rng: random.Random = field(default_factory=random.Random)
    stats: dict[int, ArmStats] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def choose(self, versions: list[int], default: int) -> int:
        if self.rng.random() < self.epsilon:
            return self.rng.choice(versions)
        with self._lock:
            ready = [v for v in versions if self.stats.get(v, ArmStats()).n >= self.min_samples]
            if not ready:
                return default
            return max(ready, key=lambda v: (self.stats[v].mean, v == default))

    def reward(self, version: int, value: float) -> None:
        with self._lock:
            stats = self.stats.setdefault(version, ArmStats())
            stats.n += 1
            stats.total += value


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
        self.policy = policy
        self.state = SlotState(production, {production.version: production})
        self.rng = random.Random()

    def choose(self, state: SlotState | None = None) -> LoadedModel:
        state = state or self.state  # one read: the whole choice uses one state
        if state.canary is not None and self.rng.random() < state.canary_share:
            return state.canary
        if self.policy is None or len(state.arms) == 1:
            return state.production
        version = self.policy.choose(sorted(state.arms), state.production.version)
        return state.arms[version]

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


class RecentPredictions:
    """prediction id -> (model, version, prediction) for feedback; the oldest are forgotten."""

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
