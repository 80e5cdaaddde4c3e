"""The predictor's model selection, wired: policies per model name, their shared state, the
feedback consumer that teaches them, the Exp4 ensembles, and their metrics.

serving/app.py calls this module at four points: ``Bandit.create`` when the predictor is built,
``policy`` and ``ensemble`` when a model name is served, ``start`` once the models are loaded,
``close`` at shutdown. With selection_policy "fixed" (and bandit_epsilon 0) there is no state,
no consumer and no Redis connection.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from core.settings import Settings
from features.labels import Labels
from serving.ensemble import Ensemble
from serving.feedback import FeedbackConsumer, PolicyUpdater, label_sources
from serving.feedback_join import FeedbackJoin
from serving.policy_state import CachedPolicyState, PolicyStore, RedisPolicyStore, state_key
from serving.selection import EpsilonGreedy, Exp3, Exp4, FixedPolicy, ModelSlot, SelectionPolicy

REFRESH_S = 0.2  # how old a replica's copy of the shared policy state may be


def policy_kind(settings: Settings) -> str:
    if settings.selection_policy == "fixed" and settings.bandit_epsilon > 0:
        return "epsilon_greedy"  # bandit_epsilon alone turned the bandit on before
    return settings.selection_policy


class Bandit:
    def __init__(self, settings: Settings, state: CachedPolicyState | None) -> None:
        self.settings = settings
        self.kind = policy_kind(settings)
        self.state = state
        self.consumer: FeedbackConsumer | None = None
        self.ensembles: dict[str, Ensemble] = {}
        self._slots: Callable[[], Mapping[str, ModelSlot]] = dict

    @classmethod
    def create(cls, settings: Settings, store: PolicyStore | None = None) -> Bandit:
        if policy_kind(settings) == "fixed":
            return cls(settings, None)
        store = store or RedisPolicyStore.from_url(settings.redis_url)
        return cls(settings, CachedPolicyState(store, REFRESH_S))

    def policy(self, name: str) -> SelectionPolicy:
        s = self.settings
        state = self.state
        if state is None:
            return FixedPolicy()
        kind = {"epsilon_greedy": EpsilonGreedy.kind, "exp3": Exp3.kind, "exp4": Exp4.kind}
        prefix = kind[self.kind]

        def read(context: str) -> Mapping[str, float]:
            return state.get(state_key(name, prefix, context))

        if self.kind == "epsilon_greedy":
            return EpsilonGreedy(s.bandit_epsilon, read=read, rng=random.Random())
        if self.kind == "exp3":
            return Exp3(s.bandit_eta, s.bandit_exploration, read=read, rng=random.Random())
        return Exp4(s.bandit_eta, read=read)

    def ensemble(self, slot: ModelSlot) -> Ensemble | None:
        """Exp4's ensemble for a served model (None for the other policies)."""
        if self.kind != "exp4":
            return None
        s = self.settings
        ensemble = Ensemble(
            slot,
            deadline_s=s.ensemble_deadline_ms / 1000,
            min_models=s.ensemble_min_models,
            context_field=s.bandit_context_field,
            workers=2 * s.bandit_arms,
        )
        self.ensembles[slot.name] = ensemble
        return ensemble

    @property
    def arms(self) -> int:
        """How many versions a model serves at once."""
        return 1 if self.kind == "fixed" else self.settings.bandit_arms

    def start(
        self,
        slots: Callable[[], Mapping[str, ModelSlot]],
        *,
        consume: bool,
        labels: Sequence[Labels] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """Refresh the state and, with ``consume``, run the feedback consumer (needs Kafka)."""
        self._slots = slots
        if registry is not None:
            registry.register(_BanditCollector(self))
        if self.state is None:
            return
        self.state.start()
        if not consume:
            return
        s = self.settings
        services_of = {n: sl.state.production.metadata.feature_service for n, sl in slots().items()}
        join = FeedbackJoin(
            label_sources(s, labels),
            services_of,
            context_field=s.bandit_context_field,
            horizon_ms=int(s.feedback_horizon_s * 1000),
            match_ms=s.feedback_match_ms,
        )
        updater = PolicyUpdater(slots, self.state, s.bandit_loss_scale)
        self.consumer = FeedbackConsumer(s, join, updater)
        self.consumer.start()

    def label_topics(self, labels: Sequence[Labels] | None = None) -> list[str]:
        if self.state is None:
            return []
        return [source.topic for source in label_sources(self.settings, labels)]

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
        if self.state is not None:
            self.state.close()
        for ensemble in self.ensembles.values():
            ensemble.close()


class _BanditCollector(Collector):
    """/metrics: the feedback join's counts, each served version's share, ensemble stragglers."""

    def __init__(self, bandit: Bandit) -> None:
        self.bandit = bandit

    def collect(self) -> Iterator[Any]:
        feedback = CounterMetricFamily(
            "sluice_feedback",
            "Feedback consumer: predictions buffered, labels read, matched, unmatched, expired, "
            "evicted, invalid; shadow predictions left out; policy updates applied and stale",
            labels=["outcome"],
        )
        consumer = self.bandit.consumer
        if consumer is not None:
            for outcome, value in consumer.counts().items():
                if outcome not in ("buffered", "waiting"):
                    feedback.add_metric([outcome], value)
        yield feedback
        share = GaugeMetricFamily(
            "sluice_policy_share",
            "Share of traffic (Exp4: of the ensemble's answer) each served version gets, in the "
            "global context",
            labels=["model", "version"],
        )
        for name, slot in self.bandit._slots().items():
            versions = sorted(slot.state.arms)
            weights = slot.policy.weights(versions, slot.state.production.version)
            for version, weight in weights.items():
                share.add_metric([name, str(version)], weight)
        yield share
        missing = CounterMetricFamily(
            "sluice_ensemble_missing",
            "Rows an ensemble answered without a version (a straggler past the deadline)",
            labels=["model", "version"],
        )
        for name, ensemble in self.bandit.ensembles.items():
            for version, rows in ensemble.missing.items():
                missing.add_metric([name, str(version)], rows)
        yield missing
