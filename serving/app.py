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

Modules: serving/predictor.py (Predictor, Served: the state the routes share and the one
predict path; ``build`` from settings), serving/routes.py (the routes above, error handlers,
request metrics), serving/oip.py and serving/rollout.py (their routes); this module assembles
the app and owns its lifespan. ``Predictor`` and ``Served`` are re-exported here.

Access: bearer tokens by scope (serving/auth.py: routes declare ``require(Scope...)``), and a
body size limit before parsing and strict JSON (serving/limits.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI

from core.settings import Settings
from features.definitions import FeatureService
from features.labels import Labels
from models.registry import ModelRegistry
from serving import auth, routes
from serving.fastpath import PredictorApp
from serving.features import FeatureReader
from serving.limits import BodyLimit, JsonRoute
from serving.oip import router as oip_router
from serving.openapi import install as install_openapi
from serving.policy_state import PolicyStore
from serving.prediction_log import ProducerLike
from serving.predictor import Predictor, Served, attach_rollouts, build
from serving.rollout import RolloutBus, rollout_router

__all__ = ["Predictor", "Served", "create_app"]

log = logging.getLogger("sluice.serving")


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
            build, settings, reader, registry, producer, services, policy_store, labels
        )
        app.state.predictor = predictor
        shared = getattr(app.state, "worker_metrics", None)  # serving.workers: (dir, worker)
        if shared is not None:
            predictor.metrics.share(*shared)
        predictor.rollouts = attach_rollouts(predictor, bus)
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
            if predictor.metrics.workers is not None:
                await asyncio.to_thread(predictor.metrics.workers.stop)
            log.info("predictor stopped", extra={"log": vars(counts)})

    app = PredictorApp(
        title="Sluice predictor",
        description="Online predictions from batch, streaming and request features.",
        version="1",
        lifespan=lifespan,
        # FastAPI's native OpenTelemetry: off (sluice's metrics are Prometheus', /metrics).
        # Unconfigured it records nothing, yet checks the global providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.router.route_class = JsonRoute  # before any route: each parses JSON with orjson
    # Inside the metrics. POST /predict skips both: serving/fastpath.py does what they do.
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    routes.install(app)
    # The OIP routes join the app's own list (an included router would be one opaque entry
    # there, hidden from the checks that walk app.routes: auth's scopes, the OpenAPI ones).
    app.router.routes.extend(oip_router.routes)
    app.router.routes.extend(rollout_router().routes)
    install_openapi(app)
    auth.install(app, settings)
    return app
