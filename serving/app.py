"""The FastAPI predictor: POST /predict, /feedback, GET /models, promote, /health, /metrics.

Per model, an AdaptiveBatcher queues rows; a batch reads every online feature it needs in one
round trip (feature_repo.online_store.OnlineStore.read_many, the store open_online_store
builds: each entity's newest row and the one before it), picks per row and view the row the
availability contract serves at the row's t (its arrival, or its event_time), joins them in the
model's order with the request features, predicts with LightGBM in a worker thread and answers
each row with its prediction, model version, prediction id, the window ends served, feature
ages and missing/stale/behind flags (serve_behind decides what a row behind the contract
gets). Every prediction is logged to Kafka without waiting for the broker (prediction_log.KafkaLog,
through a local write-ahead log) as a core.records.PredictionRecord, feedback as a
FeedbackRecord.

Errors: serving.errors types, mapped to HTTP statuses by one exception handler; request
validation failures (FastAPI's and the per-model row checks) answer 422 with
{"error": "invalid_request", "detail": [{"field": ..., "reason": ...}]}; Starlette's own
(404, 405, a body that does not parse: 400) come in the same shape.

Access: bearer tokens by scope (serving/auth.py: routes declare ``require(Scope...)``), and a
body size limit before parsing and strict JSON (serving/limits.py).
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
from http import HTTPStatus
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as AsgiScope

from core.errors import SluiceError, http_status
from core.records import FeedbackRecord, PredictionRecord
from core.settings import Settings
from features.definitions import FeatureService
from features.labels import Labels
from models.registry import ModelRegistry
from serving import auth, deadlines
from serving.auth import Scope, require
from serving.bandit import Bandit
from serving.batcher import AdaptiveBatcher, AimdController, KeyedBatchers, QueueFullError
from serving.breaker import STATE_VALUE, BreakerState, CircuitBreaker, GuardedReader
from serving.cache import CacheCollector, PredictionCache
from serving.errors import FeaturesBehindError, ModelNotFoundError, OverloadedError
from serving.features import FeatureReader
from serving.limits import BodyLimit, JsonRoute
from serving.metrics import ServingMetrics
from serving.model import LoadedModel, Prediction, PredictItem, load_model, predict_batch
from serving.oip import router as oip_router
from serving.openapi import install as install_openapi
from serving.policy_state import PolicyStore
from serving.prediction_log import KafkaLog, LogCollector, ProducerLike, open_prediction_log
from serving.rollout import (
    LocalBus,
    RedisBus,
    RolloutBus,
    Rollouts,
    ShadowRunner,
    Target,
    rollout_router,
)
from serving.schemas import (
    PREDICT_BODY,
    ErrorBody,
    FeedbackRequest,
    FeedbackResponse,
    InvalidRequestBody,
    PredictResponse,
    parse_predict,
    problems_of,
    row_model,
    validate_rows,
)
from serving.selection import ModelSlot, RecentPredictions

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
                predict,
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
        items = [
            PredictItem(
                fixed or served.slot.choose(str(row.get(context, "")) if context else "", state),
                row,
                arrived_ms if t is None else t,
            )
            for row, t in checked
        ]
        self.metrics.queue_depth.labels(served.slot.name).set(served.batchers.queued)
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
            m.predictions.labels(prediction.model, str(prediction.version)).inc()
            if joined.degraded:
                m.degraded_rows.labels(prediction.model, joined.degraded_reason or "").inc()
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
            degraded=joined.degraded or None,
            ensemble=prediction.ensemble,
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
    policy_store: PolicyStore | None = None,
    labels: Sequence[Labels] | None = None,
    bus: RolloutBus | None = None,
) -> FastAPI:
    """The predictor app. Unset dependencies come from settings (Redis, Kafka, models_dir).

    The feedback consumer (serving/feedback.py) runs when the producer is Kafka's (not given)
    and the selection policy learns; ``labels`` default to the domain's declarations."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        predictor = await asyncio.to_thread(
            _build, settings, reader, registry, producer, services, policy_store, labels
        )
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
            await asyncio.to_thread(predictor.bandit.close)
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
    app.router.route_class = JsonRoute  # before any route: each parses JSON with orjson
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)  # inside the metrics
    _routes(app)
    # The OIP routes join the app's own list (an included router would be one opaque entry
    # there, hidden from the checks that walk app.routes: auth's scopes, the OpenAPI ones).
    app.router.routes.extend(oip_router.routes)
    app.router.routes.extend(rollout_router().routes)
    install_openapi(app)
    auth.install(app, settings)
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
        bus or (RedisBus(s.redis_url, s.serve_models) if s.rollout_bus == "redis" else LocalBus()),
        s.rollout_poll_s,
        predictor.applied,
    )


def _build(
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
        breaker = _breaker(settings, metrics)
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


def _breaker(settings: Settings, metrics: ServingMetrics) -> CircuitBreaker:
    """The online store's breaker, its state and transitions in the metrics."""

    def moved(before: BreakerState, after: BreakerState) -> None:
        metrics.breaker_state.set(STATE_VALUE[after])
        metrics.breaker_transitions.labels(after.value).inc()

    return CircuitBreaker(
        settings.breaker_failures, settings.breaker_open_ms / 1000, on_transition=moved
    )


class _RequestMetrics:
    """Count requests by route and status, and time them (pure ASGI: BaseHTTPMiddleware, what
    @app.middleware builds, costs several times more per request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
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
        headers = getattr(exc, "headers", None)
        return JSONResponse(jsonable_encoder(exc.body()), status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's own errors (404, 405, 400 for a body that does not parse) as ours."""
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        body = {"error": code, "detail": exc.detail}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        body = {"error": "invalid_request", "detail": problems_of(exc.errors())}
        return JSONResponse(jsonable_encoder(body), status_code=422)

    app.add_middleware(_RequestMetrics)

    @app.post(
        "/predict",
        dependencies=[require(Scope.PREDICT)],
        response_model=PredictResponse,
        # The body is read and checked by parse_predict (orjson + the served models' row
        # models); its schema, with each model's rows, is set by serving.openapi.
        openapi_extra={"requestBody": PREDICT_BODY},
        responses={
            404: {"model": ErrorBody, "description": "the model is not served here"},
            413: {"model": ErrorBody, "description": "the body is larger than allowed"},
            422: {
                "model": InvalidRequestBody,
                "description": "invalid request: each bad field named, with the reason",
            },
            503: {
                "model": ErrorBody,
                "description": "the online store is down (feature_store_unavailable, with "
                "serve_store_unavailable=reject; by default such rows are answered from the "
                "views' empty values and listed under `degraded`), the queue is full "
                "(overloaded), or with serve_behind=reject some rows' features are behind the "
                "availability contract (features_behind, naming the views)",
            },
            504: {
                "model": ErrorBody,
                "description": "with serve_store_unavailable=reject: the request's deadline "
                f"(deadline_ms, header {deadlines.HEADER}) passed first (deadline_exceeded)",
            },
        },
    )
    async def predict(request: Request) -> Response:
        """Predict one or many rows; each row joins whatever batch its model is forming."""
        body = parse_predict(await request.body())
        predictor = _predictor(request)
        answered = await predictor.predict_rows(
            predictor.get(body.model),
            body.rows,
            deadline_ms=body.deadline_ms,
            timeout_header=request.headers.get(deadlines.HEADER),
        )
        out = []
        for prediction in answered:
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
                "degraded": prediction.joined.degraded,
            }
            if prediction.ensemble is not None:
                answer["ensemble"] = prediction.ensemble
            if body.return_features:
                answer["features"] = prediction.joined.values
            out.append(answer)
        # Built as PredictResponse documents it; returned as bytes directly, since validating
        # our own answer again costs more than the prediction on the hot path.
        return Response(orjson.dumps({"predictions": out}), media_type="application/json")

    @app.post(
        "/feedback",
        dependencies=[require(Scope.FEEDBACK)],
        response_model=FeedbackResponse,
        status_code=202,
        responses={422: {"model": InvalidRequestBody, "description": "invalid request"}},
    )
    async def feedback(body: FeedbackRequest, request: Request) -> FeedbackResponse:
        """The observed label of a prediction, to the feedback topic; the feedback consumer
        (serving/feedback.py) joins it with the prediction log and teaches the policy once,
        whichever replica made the prediction."""
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
        predictor.log.send(
            predictor.settings.feedback_topic, body.prediction_id.encode(), record.encode()
        )
        return FeedbackResponse(
            prediction_id=body.prediction_id, matched=known is not None, error=error
        )

    @app.get("/models", dependencies=[require(Scope.PREDICT)])
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
            "log": predictor.log.summary(),
            "feature_store": predictor.breaker.state.value if predictor.breaker else None,
        }

    @app.get("/metrics", response_class=Response)
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
