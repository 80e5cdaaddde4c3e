"""The FastAPI predictor: POST /predict, /feedback, GET /models, promote, /health, /metrics.

Per model, an AdaptiveBatcher queues rows; a batch reads every online feature it needs in one
round trip (feature_repo.online_store.OnlineStore.read_many, the store open_online_store
builds: each entity's newest row and the one before it), picks per row and view the row the
availability contract serves at the row's t (its arrival, or its event_time), joins them in the
model's order with the request features, predicts with LightGBM in a worker thread and answers
each row with its prediction, model version, prediction id, the window ends served, feature
ages and missing/stale/behind flags (serve_behind decides what a row behind the contract
gets). Every prediction is logged to Kafka without waiting (prediction_log.KafkaLog) as a
core.records.PredictionRecord, feedback as a FeedbackRecord.

Errors: serving.errors types, mapped to HTTP statuses by one exception handler; request
validation failures (FastAPI's and the per-model row checks) answer 422 with
{"error": "invalid_request", "detail": [{"field": ..., "reason": ...}]}.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import SluiceError, http_status
from core.records import FeedbackRecord, PredictionRecord
from core.settings import Settings
from features.definitions import FeatureService
from models.registry import ModelRegistry
from serving.batcher import AdaptiveBatcher, AimdController, KeyedBatchers, QueueFullError
from serving.cache import CacheCollector, PredictionCache
from serving.errors import FeaturesBehindError, ModelNotFoundError, OverloadedError
from serving.features import FeatureReader
from serving.metrics import ServingMetrics
from serving.model import LoadedModel, Prediction, PredictItem, load_model, predict_batch
from serving.prediction_log import KafkaLog, ProducerLike, kafka_producer
from serving.rollout import RedisBus, RolloutBus, Rollouts, ShadowRunner, Target, rollout_router
from serving.schemas import (
    FeedbackRequest,
    FeedbackResponse,
    PredictRequest,
    PredictResponse,
    problems_of,
    row_model,
    validate_rows,
)
from serving.selection import EpsilonGreedy, ModelSlot, RecentPredictions

log = logging.getLogger("sluice.serving")


@dataclass
class Served:
    """One served model name: its versions, its row validator and a batcher per version."""

    slot: ModelSlot
    rows: type[BaseModel]
    batchers: KeyedBatchers[int, PredictItem, Prediction]

    def submit(self, item: PredictItem, arrived: float | None = None) -> Awaitable[Prediction]:
        """Queue a row in the batch of its model version (``arrived``: time.perf_counter)."""
        return self.batchers.get(item.model.version).submit(item, arrived)


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
    cache: PredictionCache | None = None
    served: dict[str, Served] = field(default_factory=dict)
    recent: RecentPredictions = field(default_factory=RecentPredictions)
    rollouts: Rollouts | None = None
    shadows: ShadowRunner | None = None

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
        if self.settings.bandit_epsilon <= 0 or self.settings.bandit_arms <= 1:
            return []
        others = [v for v in self.registry.versions(name) if v != production]
        return others[-(self.settings.bandit_arms - 1) :]

    def serve(self, name: str) -> Served:
        version = self.registry.production(name)
        if version is None:
            raise ModelNotFoundError(
                f"model {name!r} has no production version in {self.registry.root} "
                "(run `sluice train`, or promote a version)"
            )
        production = self.load(name, version)
        bandit = (
            EpsilonGreedy(self.settings.bandit_epsilon)
            if self.settings.bandit_epsilon > 0
            else None
        )
        slot = ModelSlot(production, bandit)
        arms = {v: self.load(name, v) for v in self.arm_versions(name, version)}
        slot.swap(production, arms)
        return Served(slot, row_model(production.plan, name), KeyedBatchers(self._batcher(name)))

    def _batcher(self, name: str) -> Callable[[int], AdaptiveBatcher[PredictItem, Prediction]]:
        """The batcher factory of one model name: one AIMD controller per version."""
        s = self.settings

        def make(version: int) -> AdaptiveBatcher[PredictItem, Prediction]:
            controller = AimdController(
                objective_ms=s.latency_objective_ms,
                max_size=s.max_batch_size,
                increase=s.batch_increase,
                backoff=s.batch_backoff,
            )
            m, label = self.metrics, str(version)

            def on_batch(rows: int, latency_ms: float, process_ms: float) -> None:
                m.batch_rows.labels(name).observe(rows)
                m.batch_latency.labels(name).observe(process_ms / 1000)
                m.batch_request_latency.labels(name, label).observe(latency_ms / 1000)
                m.batch_size.labels(name, label).set(controller.size)

            m.batch_size.labels(name, label).set(controller.size)
            return AdaptiveBatcher(
                lambda items: predict_batch(
                    self.reader, items, serve_behind=s.serve_behind, cache=self.cache
                ),
                controller,
                max_delay_s=s.max_batch_delay_ms / 1000,
                executor=self.executor,
                on_batch=on_batch,
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
        counter = self.metrics.contract_rows
        for prediction in predictions:
            for view, status in prediction.joined.status.items():
                counter.labels(view, status.value).inc()

    def reject_behind(self, predictions: Sequence[Prediction]) -> None:
        """With serve_behind = "reject": a 503 naming the views of rows behind the contract."""
        if self.settings.serve_behind != "reject":
            return
        behind = {i: p.joined.behind for i, p in enumerate(predictions) if p.joined.behind}
        if behind:
            raise FeaturesBehindError(behind)

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
            m.predictions.labels(prediction.model, str(prediction.version)).inc()
            for view, age in joined.ages_ms.items():
                if view in joined.missing:
                    m.missing.labels(view).inc()
                if age is not None:
                    m.feature_age.labels(view).observe(age / 1000)
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
            shadow_of=shadow_of,
        )
        self.log.send(
            self.settings.prediction_topic, prediction.prediction_id.encode(), record.encode()
        )


def create_app(
    settings: Settings,
    *,
    reader: FeatureReader | None = None,
    registry: ModelRegistry | None = None,
    producer: ProducerLike | None = None,
    services: Mapping[str, FeatureService] | None = None,
    bus: RolloutBus | None = None,
) -> FastAPI:
    """The predictor app. Unset dependencies come from settings (Redis, Kafka, models_dir)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        predictor = await asyncio.to_thread(_build, settings, reader, registry, producer, services)
        app.state.predictor = predictor
        predictor.rollouts = _rollouts(predictor, bus)
        predictor.rollouts.start()
        try:
            yield
        finally:
            await predictor.rollouts.stop()
            if predictor.shadows is not None:
                await predictor.shadows.drain()
            for served in predictor.served.values():
                await served.batchers.stop()
            counts = await asyncio.to_thread(predictor.log.close)
            predictor.executor.shutdown(wait=True)
            close = getattr(predictor.reader, "close", None)
            if reader is None and close is not None:
                close()
            log.info("predictor stopped", extra={"log": vars(counts)})

    app = FastAPI(
        title="Sluice predictor",
        description="Online predictions from batch, streaming and request features.",
        version="1",
        lifespan=lifespan,
    )
    _routes(app)
    app.include_router(rollout_router())
    return app


def _rollouts(predictor: Predictor, bus: RolloutBus | None) -> Rollouts:
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
        bus or RedisBus(s.redis_url, s.serve_models),
        s.rollout_poll_s,
        predictor.applied,
    )


def _build(
    settings: Settings,
    reader: FeatureReader | None,
    registry: ModelRegistry | None,
    producer: ProducerLike | None,
    services: Mapping[str, FeatureService] | None,
) -> Predictor:
    from feature_repo.online_store import open_online_store
    from features.registry import load_registry

    if services is None:
        services = load_registry(settings.definitions_module).services
    if producer is None:
        from core.kafka import ensure_topics

        ensure_topics(settings, [settings.prediction_topic, settings.feedback_topic])
        producer = kafka_producer(settings)
    metrics = ServingMetrics()
    kafka_log = KafkaLog(
        producer,
        max_queue=settings.prediction_log_queue,
        retries=settings.prediction_log_retries,
        on_outcome=lambda outcome, topic: metrics.log_records.labels(topic, outcome).inc(),
    )
    cache = PredictionCache(settings.cache_max_bytes) if settings.cache_max_bytes > 0 else None
    if cache is not None:
        metrics.registry.register(CacheCollector(cache))
    predictor = Predictor(
        settings=settings,
        registry=registry or ModelRegistry(settings.models_dir),
        services=services,
        reader=reader or open_online_store(settings),
        log=kafka_log,
        metrics=metrics,
        executor=ThreadPoolExecutor(max_workers=4, thread_name_prefix="sluice-batch"),
        cache=cache,
    )
    for name in settings.serve_models:
        predictor.served[name] = predictor.serve(name)
    kafka_log.start()
    return predictor


class _RequestMetrics:
    """Count requests by route and status, and time them (pure ASGI: BaseHTTPMiddleware, what
    @app.middleware builds, costs several times more per request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_and_see(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            predictor = getattr(scope["app"].state, "predictor", None)
            if predictor is not None:
                path = getattr(scope.get("route"), "path", "unmatched")
                predictor.metrics.requests.labels(path, str(status[0])).inc()
                predictor.metrics.request_latency.labels(path).observe(
                    time.perf_counter() - started
                )


def _predictor(request: Request) -> Predictor:
    predictor: Predictor = request.app.state.predictor
    return predictor


def _routes(app: FastAPI) -> None:
    @app.exception_handler(SluiceError)
    async def sluice_error(request: Request, exc: SluiceError) -> JSONResponse:
        status = http_status(exc)
        if status >= 500:
            log.error("request failed", extra={"path": request.url.path, "error": str(exc)})
        return JSONResponse(jsonable_encoder(exc.body()), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        body = {"error": "invalid_request", "detail": problems_of(exc.errors())}
        return JSONResponse(jsonable_encoder(body), status_code=422)

    app.add_middleware(_RequestMetrics)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses={
            422: {"description": "invalid request: each bad field named, with the reason"},
            503: {
                "description": "the online store is down (feature_store_unavailable), the "
                "queue is full (overloaded), or with serve_behind=reject some rows' features "
                "are behind the availability contract (features_behind, naming the views)"
            },
        },
    )
    async def predict(body: PredictRequest, request: Request) -> Response:
        """Predict one or many rows; each row joins whatever batch its model is forming."""
        started = time.perf_counter()
        arrived_ms = int(time.time() * 1000)  # t of the contract, unless a row has event_time
        predictor = _predictor(request)
        served = predictor.get(body.model)
        checked = validate_rows(served.rows, body.rows)
        rows = [row for row, _ in checked]
        state = served.slot.state  # one state for the choices and the shadows
        items = [
            PredictItem(served.slot.choose(state), row, arrived_ms if t is None else t)
            for row, t in checked
        ]
        predictor.metrics.queue_depth.labels(served.slot.name).set(served.batchers.queued)
        try:
            results = await asyncio.gather(*(served.submit(item, started) for item in items))
        except QueueFullError as exc:
            raise OverloadedError(f"model {served.slot.name!r}: {exc}") from None
        predictor.count_contract(results)
        predictor.reject_behind(results)
        if state.shadows and predictor.shadows is not None:
            predictor.shadows.mirror(state.shadows, [(i.row, i.t_ms) for i in items], results)
        latency_ms = (time.perf_counter() - started) * 1000
        out = []
        for row, prediction in zip(rows, results, strict=True):
            predictor.record(prediction, latency_ms, row)
            answer = {
                "prediction_id": prediction.prediction_id,
                "prediction": prediction.prediction,
                "model": prediction.model,
                "model_version": prediction.version,
                "feature_ages_ms": prediction.joined.ages_ms,
                "window_ends_ms": prediction.joined.window_ends_ms,
                "missing": prediction.joined.missing,
                "stale": prediction.joined.stale,
                "behind": prediction.joined.behind,
            }
            if body.return_features:
                answer["features"] = prediction.joined.values
            out.append(answer)
        # Built as PredictResponse documents it; returned as bytes directly, since validating
        # our own answer again costs more than the prediction on the hot path.
        return Response(orjson.dumps({"predictions": out}), media_type="application/json")

    @app.post("/feedback", response_model=FeedbackResponse, status_code=202)
    async def feedback(body: FeedbackRequest, request: Request) -> FeedbackResponse:
        """The observed label of a prediction: to the feedback topic, and to the bandit."""
        predictor = _predictor(request)
        known = predictor.recent.pop(body.prediction_id)
        error = None
        record = FeedbackRecord(body.prediction_id, body.label, int(time.time() * 1000))
        if known is not None:
            model, version, value = known
            error = body.label - value
            record = FeedbackRecord(
                body.prediction_id, body.label, record.time_ms, model, version, value
            )
            served = predictor.served.get(model)
            if served is not None and served.slot.policy is not None:
                served.slot.policy.reward(version, -abs(error))
        predictor.log.send(
            predictor.settings.feedback_topic, body.prediction_id.encode(), record.encode()
        )
        return FeedbackResponse(
            prediction_id=body.prediction_id, matched=known is not None, error=error
        )

    @app.get("/models")
    async def models(request: Request) -> dict[str, Any]:
        """Models in the registry (versions, metrics, production) and what this server runs."""
        predictor = _predictor(request)
        registry = await asyncio.to_thread(predictor.registry.describe)
        serving = {name: _serving(served) for name, served in predictor.served.items()}
        return {"registry": registry, "serving": serving}

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        predictor = _predictor(request)
        return {
            "status": "ok",
            "models": {n: s.slot.state.production.version for n, s in predictor.served.items()},
            "log": vars(predictor.log.counts) | {"pending": predictor.log.counts.pending},
        }

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus text format."""
        registry = _predictor(request).metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _serving(served: Served) -> dict[str, Any]:
    """What one model name serves here (GET /models)."""
    state = served.slot.state
    production = state.production.version
    batchers = served.batchers.batchers
    return {
        "production": production,
        "versions": sorted(state.arms),
        "canary": None
        if state.canary is None
        else {"version": state.canary.version, "share": state.canary_share},
        "shadows": [m.version for m in state.shadows],
        # AIMD per version; "batch_size" is production's (1 until its first request).
        "batch_size": batchers[production].controller.size if production in batchers else 1,
        "batch_sizes": {str(v): b.controller.size for v, b in sorted(batchers.items())},
        "queued": served.batchers.queued,
        "features": list(state.production.plan.refs),
    }
