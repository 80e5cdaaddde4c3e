"""The predictor's own routes (/predict, /feedback, /models, /health, /metrics), its error
handlers and the request metrics middleware.

Errors: serving.errors types, mapped to HTTP statuses by one exception handler; request
validation failures (FastAPI's and the per-model row checks) answer 422 with
{"error": "invalid_request", "detail": [{"field": ..., "reason": ...}]}; Starlette's own
(404, 405, a body that does not parse: 400) come in the same shape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as AsgiScope

from core.errors import SluiceError, http_status
from core.records import FeedbackRecord
from serving import deadlines
from serving.auth import Scope, require
from serving.predictor import Predictor, Served
from serving.schemas import (
    PREDICT_BODY,
    ErrorBody,
    FeedbackRequest,
    FeedbackResponse,
    InvalidRequestBody,
    PredictResponse,
    parse_predict,
    problems_of,
)

log = logging.getLogger("sluice.serving")


class RequestMetrics:
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
                predictor.metrics.request_children(path, status[0]).inc()
                predictor.metrics.request_latency_child(path).observe(time.perf_counter() - started)


def _predictor(request: Request) -> Predictor:
    predictor: Predictor = request.app.state.predictor
    return predictor


def error_response(exc: SluiceError, path: str) -> JSONResponse:
    """A SluiceError as the HTTP answer: its status (core.errors.http_status), its body."""
    status = http_status(exc)
    if status >= 500:
        log.error("request failed", extra={"path": path, "error": str(exc)})
    headers = getattr(exc, "headers", None)
    return JSONResponse(jsonable_encoder(exc.body()), status_code=status, headers=headers)


async def predict_answer(predictor: Predictor, raw: bytes, timeout_header: str | None) -> bytes:
    """The /predict answer (JSON bytes) to a raw body; raises SluiceError for a bad request."""
    body = parse_predict(raw)
    answered = await predictor.predict_rows(
        predictor.get(body.model),
        body.rows,
        deadline_ms=body.deadline_ms,
        timeout_header=timeout_header,
    )
    out = []
    for prediction in answered:
        joined = prediction.joined
        answer = {
            "prediction_id": prediction.prediction_id,
            "prediction": prediction.prediction,
            "model": prediction.model,
            "model_version": prediction.version,
            "feature_ages_ms": joined.ages_ms,
            "window_ends_ms": joined.window_ends_ms,
            "missing": joined.missing,
            "stale": joined.stale,
            "behind": joined.behind,
            "degraded": joined.degraded,
        }
        if prediction.ensemble is not None:
            answer["ensemble"] = prediction.ensemble
        if body.return_features:
            answer["features"] = joined.values
        out.append(answer)
    # Built as PredictResponse documents it; returned as bytes directly, since validating
    # our own answer again costs more than the prediction on the hot path.
    return orjson.dumps({"predictions": out})


def install(app: FastAPI) -> None:
    @app.exception_handler(SluiceError)
    async def sluice_error(request: Request, exc: SluiceError) -> JSONResponse:
        return error_response(exc, request.url.path)

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

    app.add_middleware(RequestMetrics)

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
        """Predict one or many rows; each row joins whatever batch its model is forming.
        (serving/fastpath.py answers POST /predict before the router; this route documents
        it and answers when the app runs without that middleware.)"""
        answer = await predict_answer(
            _predictor(request), await request.body(), request.headers.get(deadlines.HEADER)
        )
        return Response(answer, media_type="application/json")

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
        metrics = _predictor(request).metrics  # with --workers: every worker's (WorkerMetrics)
        return Response(await asyncio.to_thread(metrics.exposition), media_type=CONTENT_TYPE_LATEST)


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
