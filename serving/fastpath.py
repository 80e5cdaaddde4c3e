"""POST /predict answered before FastAPI's stack: the hot path without its per-request cost.

``PredictorApp`` (the app serving/app.py builds) hands ``POST /predict`` to ``PredictFastPath``
as soon as the predictor has started, before Starlette's middleware stack, the router, the
dependency solving (FastAPI's Security/HTTPBearer machinery), the Request object and the
exception middleware's wrapping. The fast path does itself, in the same order, what those layers
do for every other route:

- the request metrics (serving.routes.RequestMetrics): counted and timed under the route's path
  (``scope["route"]`` is set to the route), with the status answered (500 when none was);
- the body limit (serving/limits.py BodyLimit): a Content-Length above ``max_request_bytes``
  is a 413 before a byte is read, a chunked body is read up to the limit;
- the bearer token checked for the predict scope (serving/auth.py), before the body is read;
- the body parsed and answered by serving.routes.predict_answer; a SluiceError answered by
  serving.routes.error_response;
- anything else: a plain-text 500 (as Starlette's ServerErrorMiddleware answers without a
  handler), and the exception raised on for the server to log.

Measured with cProfile under load (bench.serve): the layers skipped were about a third of the
event loop's per-request CPU when the fast path sat innermost of the middleware, and the
middleware above it (FastAPI's native telemetry check, Starlette's error middleware, two body
limits, the request metrics' send wrapper) another ~15%. The route stays registered: it
documents the path in the OpenAPI document and answers whenever the fast path is off
(``PredictorApp.fast_path = False``) or the predictor has not started.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.types import Message, Receive, Send
from starlette.types import Scope as AsgiScope

from core.errors import SluiceError
from serving.auth import Authenticator, Scope
from serving.deadlines import HEADER
from serving.errors import RequestTooLargeError

PATH = "/predict"
_TIMEOUT_HEADER = HEADER.lower().encode("latin-1")
_JSON_HEADERS = [(b"content-type", b"application/json")]
_SERVER_ERROR: list[Message] = [
    {
        "type": "http.response.start",
        "status": 500,
        "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21")],
    },
    {"type": "http.response.body", "body": b"Internal Server Error"},
]


class PredictorApp(FastAPI):
    """FastAPI, with POST /predict answered by PredictFastPath once the predictor runs."""

    fast_path: bool = True

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if (
            self.fast_path
            and scope["type"] == "http"
            and scope["path"] == PATH
            and scope["method"] == "POST"
        ):
            predictor = getattr(self.state, "predictor", None)
            if predictor is not None:
                scope["app"] = self
                await _fast_path(self).answer(scope, receive, send, predictor)
                return
        await super().__call__(scope, receive, send)


def _fast_path(app: FastAPI) -> PredictFastPath:
    fast: PredictFastPath | None = getattr(app.state, "fast_path", None)
    if fast is None:
        fast = app.state.fast_path = PredictFastPath(app)
    return fast


class PredictFastPath:
    """POST /predict of one app (see the module docstring)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.route = _find_route(app)

    async def answer(self, scope: AsgiScope, receive: Receive, send: Send, predictor: Any) -> None:
        started = time.perf_counter()
        scope["route"] = self.route
        status = 500
        try:
            status = await self._answer(scope, receive, send, predictor)
        except Exception:
            if status == 500:  # nothing answered yet (_answer returns once it has)
                with contextlib.suppress(Exception):  # e.g. the answer had started after all
                    for message in _SERVER_ERROR:
                        await send(message)
            raise
        finally:
            metrics = predictor.metrics
            metrics.request_children(PATH, status).inc()
            metrics.request_latency_child(PATH).observe(time.perf_counter() - started)

    async def _answer(self, scope: AsgiScope, receive: Receive, send: Send, predictor: Any) -> int:
        """Answer the request; the status answered (500: none, the client went away)."""
        from serving.routes import error_response, predict_answer  # routes import this module

        token, timeout, length = _headers(scope["headers"])
        max_bytes: int = predictor.settings.max_request_bytes
        try:
            if length is not None and length > max_bytes:
                raise _too_large(f"{length} bytes", max_bytes)
            authenticator: Authenticator = self.app.state.auth
            authenticator.check(Scope.PREDICT, token)
            raw = await _body(receive, max_bytes)
            if raw is None:  # the client went away
                return 500
            answer = await predict_answer(predictor, raw, timeout)
        except SluiceError as exc:
            response = error_response(exc, PATH)
            await response(scope, receive, send)
            return response.status_code
        headers = [*_JSON_HEADERS, (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})
        return 200


def _find_route(app: FastAPI) -> APIRoute | None:
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path == PATH and "POST" in (route.methods or ()):
            return route
    return None


def _too_large(size: str, max_bytes: int) -> RequestTooLargeError:
    return RequestTooLargeError(
        f"the request body ({size}) is above the limit of {max_bytes} bytes "
        "(setting max_request_bytes)"
    )


def _headers(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, str | None, int | None]:
    """The bearer token (as fastapi.security.HTTPBearer reads it: scheme ``bearer`` in any
    case, None otherwise), the timeout header and the Content-Length (as BodyLimit reads it)."""
    authorization = timeout = None
    length: int | None = None
    seen_length = False
    for name, value in headers:  # the first of each, as Starlette's Headers.get
        if name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
        elif name == _TIMEOUT_HEADER and timeout is None:
            timeout = value.decode("latin-1")
        elif name == b"content-length" and not seen_length:
            seen_length = True
            try:
                length = int(value)
            except ValueError:  # the server refuses such a request before it gets here
                length = None
    if not authorization:
        return None, timeout, length
    scheme, _, credentials = authorization.partition(" ")
    credentials = credentials.strip()
    token = credentials if scheme.lower() == "bearer" and credentials else None
    return token, timeout, length


async def _body(receive: Receive, max_bytes: int) -> bytes | None:
    """The body; RequestTooLargeError as soon as it passes max_bytes (a chunked body: the
    server stops one with a Content-Length at that length)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(f"more than {max_bytes} bytes", max_bytes)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
