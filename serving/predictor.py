"""The predictor's state, shared by every route: served models, their batchers, the predict path.

``Predictor`` holds what the routes share (registry, feature reader behind its circuit breaker,
prediction log, metrics, bandit, cache, rollouts); ``Predictor.predict_rows`` is the one predict
path of /predict and the OIP infer routes: rows are checked, queued to the batcher of the version
the policy chooses (serving/batcher.py: AIMD per version), answered within the request's deadline
(serving/deadlines.py), and every prediction is logged to Kafka through the local write-ahead log
(serving/prediction_log.py) without waiting for the broker. ``build`` makes one from settings
(serving/app.py's lifespan calls it in a thread), ``attach_rollouts`` adds rollout propagation and
shadow traffic (serving/rollout.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from core.records import PredictionRecord
from core.settings import Settings
from features.definitions import FeatureService
from features.labels import Labels
from models.registry import ModelRegistry
from serving import deadlines
from serving.bandit import Bandit
from serving.batcher import AdaptiveBatcher, AimdController, KeyedBatchers, QueueFullError
from serving.breaker import STATE_VALUE, BreakerState, CircuitBreaker, GuardedReader
from serving.cache import CacheCollector, PredictionCache
from serving.errors import FeaturesBehindError, ModelNotFoundError, OverloadedError
from serving.features import FeatureReader
from serving.metrics import ServingMetrics
from serving.model import (
    LoadedModel,
    Prediction,
    PredictItem,
    load_model,
    predict_batch,
    predict_batch_async,
)
from serving.policy_state import PolicyStore
from serving.prediction_log import KafkaLog, LogCollector, ProducerLike, open_prediction_log
from serving.rollout import (
    LocalBus,
    RedisBus,
    RolloutBus,
    Rollouts,
    ShadowRunner,
    Target,
)
from serving.schemas import (
    row_model,
    validate_rows,
)
from serving.selection import ModelSlot, RecentPredictions

# Batches up to this many rows run on the event loop when the store reads there too (a batch's
# LightGBM call holds the loop; the executor runs larger ones beside it).
INLINE_BATCH_ROWS = 16


@dataclass
class Served:
    """One served model name: its versions, its row validator and a batcher per version."""

    slot: ModelSlot
    rows: type[BaseModel]
    batchers: KeyedBatchers[int, PredictItem, Prediction]

    def submit(self, item: PredictItem, arrived: float | None = None) -> Awaitable[Prediction]:
        """Queue a row in the batch of its model version (``arrived``: time.perf_counter)."""
        return self.batchers.get(item.model.version).submit(item, arrived)

    def enqueue(
        self, item: PredictItem, arrived: float | None = None
    ) -> asyncio.Future[Prediction]:
        """As submit, the future returned at once (cancelling it withdraws the row)."""
        return self.batchers.get(item.model.version).enqueue(item, arrived)


@dataclass
class Predictor:
    """Everything the routes share; built by the app's lifespan."""

    settings: Settings
    registry: ModelRegistry
    services: Mapping[str, FeatureService]
    reader: FeatureReader
    log: KafkaLog
    metrics: ServingMetrics
    executor: ThreadPoolExecutor
    bandit: Bandit
    cache: PredictionCache | None = None
    served: dict[str, Served] = field(default_factory=dict)
    recent: RecentPredictions = field(default_factory=RecentPredictions)
    rollouts: Rollouts | None = None
    shadows: ShadowRunner | None = None
    breaker: CircuitBreaker | None = None  # in front of reader (serving/breaker.py)

    def get(self, name: str | None) -> Served:
        name = name or self.settings.serve_models[0]
        served = self.served.get(name)
        if served is None:
            raise ModelNotFoundError(
                f"model {name!r} is not served here (served: {', '.join(self.served)})"
            )
        return served

    def load(self, name: str, version: int) -> LoadedModel:
        return load_model(self.registry, self.services, name, version)

    def arm_versions(self, name: str, production: int) -> list[int]:
        """Bandit arms besides production: the newest other versions."""
        if self.bandit.arms <= 1:
            return []
        others = [v for v in self.registry.versions(name) if v != production]
        return others[-(self.bandit.arms - 1) :]

    def serve(self, name: str) -> Served:
        version = self.registry.production(name)
        if version is None:
            raise ModelNotFoundError(
                f"model {name!r} has no production version in {self.registry.root} "
                "(run `sluice train`, or promote a version)"
            )
        production = self.load(name, version)
        slot = ModelSlot(production, self.bandit.policy(name))
        arms = {v: self.load(name, v) for v in self.arm_versions(name, version)}
        slot.swap(production, arms)
        return Served(slot, row_model(production.plan, name), KeyedBatchers(self._batcher(slot)))

    def _batcher(
        self, slot: ModelSlot
    ) -> Callable[[int], AdaptiveBatcher[PredictItem, Prediction]]:
        """The batcher factory of one model name: one AIMD controller per version."""
        s, name = self.settings, slot.name
        ensemble = self.bandit.ensemble(slot)  # Exp4: every arm predicts each row

        def predict(items: Sequence[PredictItem]) -> list[Prediction]:
            if ensemble is not None:  # not cached: its weights move with every label
                return ensemble.predict(
                    self.reader,
                    items,
                    serve_behind=s.serve_behind,
                    on_unavailable=s.serve_store_unavailable,
                )
            return predict_batch(
                self.reader,
                items,
                serve_behind=s.serve_behind,
                on_unavailable=s.serve_store_unavailable,
                cache=self.cache,
            )

        inline = ensemble is None and getattr(self.reader, "reads_async", False)

        async def predict_on_loop(items: Sequence[PredictItem]) -> list[Prediction] | None:
            """Small batches on the event loop (no thread hand-over, feature_repo/redis_wire.py);
            larger ones, whose model time would hold the loop, in the executor."""
            if len(items) > INLINE_BATCH_ROWS:
                return None
            return await predict_batch_async(
                self.reader,
                items,
                serve_behind=s.serve_behind,
                on_unavailable=s.serve_store_unavailable,
                cache=self.cache,
            )

        def make(version: int) -> AdaptiveBatcher[PredictItem, Prediction]:
            controller = AimdController(
                objective_ms=s.latency_objective_ms,
                max_size=s.max_batch_size,
                increase=s.batch_increase,
                backoff=s.batch_backoff,
            )
            m, label = self.metrics, str(version)
            batch_rows = m.batch_rows.labels(name)
            batch_latency = m.batch_latency.labels(name)
            request_latency = m.batch_request_latency.labels(name, label)

            def on_batch(rows: int, latency_ms: float, process_ms: float) -> None:
                batch_rows.observe(rows)
                batch_latency.observe(process_ms / 1000)
                request_latency.observe(latency_ms / 1000)
                m.batch_size.labels(name, label).set(controller.size)  # removable: no cache

            m.batch_size.labels(name, label).set(controller.size)
            return AdaptiveBatcher(
                predict,
                controller,
                max_delay_s=s.max_batch_delay_ms / 1000,
                executor=self.executor,
                on_batch=on_batch,
                process_async=predict_on_loop if inline else None,
            )

        return make

    def applied(self, name: str, before: Target, after: Target) -> None:
        """After a rollout swap: stop the batchers of versions gone, count a new production."""
        served = self.served[name]
        served.batchers.retain(served.slot.models())
        for version in before.versions() - after.versions():
            with contextlib.suppress(KeyError):  # no gauge when it never had a batcher
                self.metrics.batch_size.remove(name, str(version))
        if before.production != after.production:
            self.metrics.model_swaps.labels(name).inc()

    def count_contract(self, predictions: Sequence[Prediction]) -> None:
        """sluice_contract_rows_total{view,status}: every row's verdict, answered or not."""
        child = self.metrics.contract_children
        for prediction in predictions:
            for view, status in prediction.joined.status.items():
                child(view, status.value).inc()

    def reject_behind(self, predictions: Sequence[Prediction]) -> None:
        """With serve_behind = "reject": a 503 naming the views of rows behind the contract."""
        if self.settings.serve_behind != "reject":
            return
        behind = {i: p.joined.behind for i, p in enumerate(predictions) if p.joined.behind}
        if behind:
            raise FeaturesBehindError(behind)

    async def predict_rows(
        self,
        served: Served,
        rows: Sequence[Any],
        version: int | None = None,
        deadline_ms: int | None = None,
        timeout_header: str | None = None,
    ) -> list[Prediction]:
        """The predict path of every route (/predict, OIP infer): check the rows, queue each
        to the model's batcher (the policy chooses the version, unless ``version`` names a
        served one), answer within the request's deadline (serving.deadlines), count the
        contract's verdicts, log every prediction."""
        started = time.perf_counter()
        arrived_ms = int(time.time() * 1000)  # t of the contract, unless a row has event_time
        checked = validate_rows(served.rows, rows, self.settings.max_request_rows)
        fixed = None if version is None else served.slot.state.arms.get(version)
        if version is not None and fixed is None:
            raise ModelNotFoundError(
                f"model {served.slot.name!r} version {version} is not served here "
                f"(served: {', '.join(map(str, sorted(served.slot.state.arms)))})"
            )
        context = self.settings.bandit_context_field  # Exp4/contextual state per value
        state = served.slot.state  # one state for the choices and the shadows
        items = []
        for row, t in checked:
            t_ms = arrived_ms if t is None else t
            if fixed is not None:
                items.append(PredictItem(fixed, row, t_ms))
                continue
            key = str(row.get(context, "")) if context else ""
            model, propensity = served.slot.pick(key, state)
            items.append(PredictItem(model, row, t_ms, propensity))
        self.metrics.queue_depth_children(served.slot.name).set(served.batchers.queued)
        budget = deadlines.budget_s(deadline_ms, timeout_header, self.settings)
        try:
            results = await deadlines.predict_within(
                served.enqueue, items, budget, started, self.settings.serve_store_unavailable
            )
        except QueueFullError as exc:
            raise OverloadedError(f"model {served.slot.name!r}: {exc}") from None
        self.count_contract(results)
        self.reject_behind(results)
        if state.shadows and self.shadows is not None:
            self.shadows.mirror(state.shadows, [(i.row, i.t_ms) for i in items], results)
        latency_ms = (time.perf_counter() - started) * 1000
        for (row, _), prediction in zip(checked, results, strict=True):
            self.record(prediction, latency_ms, row)
        return results

    def record(
        self,
        prediction: Prediction,
        latency_ms: float,
        row: Mapping[str, Any],
        shadow_of: str | None = None,
    ) -> None:
        """Metrics, feedback lookup and the (non-blocking) prediction log of one row (a shadow
        prediction: only the log, marked with the answer it shadows)."""
        joined = prediction.joined
        m = self.metrics
        if shadow_of is None:
            m.prediction_children(prediction.model, prediction.version).inc()
            if joined.degraded:
                m.degraded_children(prediction.model, joined.degraded_reason or "").inc()
            for view, age in joined.ages_ms.items():
                if view in joined.missing:
                    m.missing_children(view).inc()
                if age is not None:
                    m.feature_age_children(view).observe(age / 1000)
            self.recent.add(
                prediction.prediction_id,
                prediction.model,
                prediction.version,
                prediction.prediction,
            )
        record = PredictionRecord(
            prediction_id=prediction.prediction_id,
            time_ms=prediction.time_ms,
            model=prediction.model,
            model_version=prediction.version,
            prediction=prediction.prediction,
            latency_ms=round(latency_ms, 3),
            request=dict(row),
            features=joined.values,
            feature_ages_ms=joined.ages_ms,
            missing=joined.missing,
            stale=joined.stale,
            window_ends_ms=joined.window_ends_ms,
            row_status={view: status.value for view, status in joined.status.items()},
            as_of_ms=joined.as_of_ms,
            degraded=joined.degraded or None,
            ensemble=prediction.ensemble,
            shadow_of=shadow_of,
            propensity=None if shadow_of is not None else prediction.propensity,
        )
        self.log.send(
            self.settings.prediction_topic, prediction.prediction_id.encode(), record.encode()
        )


def attach_rollouts(predictor: Predictor, bus: RolloutBus | None) -> Rollouts:
    """Rollout propagation and shadow traffic (serving/rollout.py) of a built predictor."""
    s = predictor.settings
    predictor.shadows = ShadowRunner(
        lambda item: predictor.served[item.model.name].submit(item),
        lambda prediction, row, shadow_of: predictor.record(prediction, 0.0, row, shadow_of),
        lambda model, version, outcome: predictor.metrics.shadow_predictions.labels(
            model, str(version), outcome
        ).inc(),
    )
    return Rollouts(
        predictor.registry,
        {name: served.slot for name, served in predictor.served.items()},
        predictor.load,
        predictor.arm_versions,
        bus or (RedisBus(s.redis_url, s.serve_models) if s.rollout_bus == "redis" else LocalBus()),
        s.rollout_poll_s,
        predictor.applied,
    )


def build(
    settings: Settings,
    reader: FeatureReader | None,
    registry: ModelRegistry | None,
    producer: ProducerLike | None,
    services: Mapping[str, FeatureService] | None,
    policy_store: PolicyStore | None = None,
    labels: Sequence[Labels] | None = None,
) -> Predictor:
    from feature_repo.online_store import open_online_store
    from features.registry import load_registry

    if services is None:
        services = load_registry(settings.definitions_module).services
    bandit = Bandit.create(settings, policy_store)
    # The feedback consumer needs Kafka; with a given producer (tests) there is none.
    consume = producer is None
    metrics = ServingMetrics()
    # No broker needed to start: the log keeps records on local disk until it answers.
    kafka_log = open_prediction_log(settings, producer)
    try:
        metrics.registry.register(LogCollector(kafka_log))
        breaker = breaker_for(settings, metrics)
        cache = PredictionCache(settings.cache_max_bytes) if settings.cache_max_bytes else None
        if cache is not None:
            metrics.registry.register(CacheCollector(cache))
        predictor = Predictor(
            settings=settings,
            registry=registry or ModelRegistry(settings.models_dir),
            services=services,
            reader=GuardedReader(reader or open_online_store(settings), breaker),
            log=kafka_log,
            metrics=metrics,
            executor=ThreadPoolExecutor(max_workers=4, thread_name_prefix="sluice-batch"),
            bandit=bandit,
            breaker=breaker,
            cache=cache,
        )
        for name in settings.serve_models:
            predictor.served[name] = predictor.serve(name)
    except BaseException:
        kafka_log.close(0)  # release the log's directory for the next attempt
        bandit.close()
        raise
    kafka_log.start()

    def slots() -> dict[str, ModelSlot]:
        return {name: served.slot for name, served in predictor.served.items()}

    bandit.start(slots, consume=consume, labels=labels, registry=metrics.registry)
    return predictor


def breaker_for(settings: Settings, metrics: ServingMetrics) -> CircuitBreaker:
    """The online store's breaker, its state and transitions in the metrics."""

    def moved(before: BreakerState, after: BreakerState) -> None:
        metrics.breaker_state.set(STATE_VALUE[after])
        metrics.breaker_transitions.labels(after.value).inc()

    return CircuitBreaker(
        settings.breaker_failures, settings.breaker_open_ms / 1000, on_transition=moved
    )
