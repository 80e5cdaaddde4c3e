"""POST /predict answered before FastAPI's router: the hot path without its per-request cost.

A pure ASGI middleware, innermost of the app's (inside the request metrics and the body limit,
so those apply as to every route). For ``POST /predict`` it does what the route would: the
bearer token checked for the predict scope (serving/auth.py, before the body is read), the body
read, parsed and answered by serving.routes.predict_answer, a SluiceError answered by
serving.routes.error_response, anything else left to Starlette's server error middleware (a
500), as from the route. What it skips is the router's matching, dependency solving (FastAPI's
Security/HTTPBearer machinery), the Request object and the exception middleware's wrapping:
measured with cProfile under load (bench.serve), about a third of the per-request CPU of the
event loop. The route stays registered: it documents the path in the OpenAPI document and
answers whenever this middleware is not installed. The request metrics still label the request
with the route's path (``scope["route"]`` is set to it).
"""

from __future__ import annotations

from typing import Any

from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as AsgiScope

from core.errors import SluiceError
from serving.auth import Authenticator, Scope
from serving.deadlines import HEADER

PATH = "/predict"
_TIMEOUT_HEADER = HEADER.lower().encode("latin-1")
_JSON_HEADERS = [(b"content-type", b"application/json")]


class PredictFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._route: APIRoute | None = None

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        app = scope["app"]
        predictor = getattr(app.state, "predictor", None)
        if predictor is None:  # not started (no lifespan): the route answers as it would
            await self.app(scope, receive, send)
            return
        from serving.routes import error_response, predict_answer  # routes import this module

        scope["route"] = self._route or self._find_route(app)
        token, timeout = _headers(scope["headers"])
        try:
            authenticator: Authenticator = app.state.auth
            authenticator.check(Scope.PREDICT, token)
            raw = await _body(receive)
            if raw is None:  # the client went away
                return
            answer = await predict_answer(predictor, raw, timeout)
        except SluiceError as exc:
            await error_response(exc, PATH)(scope, receive, send)
            return
        headers = [*_JSON_HEADERS, (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    def _find_route(self, app: Any) -> APIRoute | None:
        for route in app.routes:
            if (
                isinstance(route, APIRoute)
                and route.path == PATH
                and "POST" in (route.methods or ())
            ):
                self._route = route
                return route
        return None


def _headers(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, str | None]:
    """The bearer token (as fastapi.security.HTTPBearer reads it: scheme ``bearer`` in any
    case, None otherwise) and the timeout header."""
    authorization = timeout = None
    for name, value in headers:  # the first of each, as Starlette's Headers.get
        if name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
        elif name == _TIMEOUT_HEADER and timeout is None:
            timeout = value.decode("latin-1")
    if not authorization:
        return None, timeout
    scheme, _, credentials = authorization.partition(" ")
    credentials = credentials.strip()
    return (credentials if scheme.lower() == "bearer" and credentials else None), timeout


async def _body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
