"""What a request body may be: its size (BodyLimit) and the JSON it parses as (JsonRoute).

BodyLimit, a pure ASGI middleware, answers 413 before anything parses.

A body whose Content-Length is above ``max_request_bytes`` is refused without reading a byte
of it. A body without Content-Length (chunked) is read up to the limit and refused as soon as
it passes it, so a client cannot make the server hold more than the limit either way; what it
sent is then replayed to the app. The answer is RequestTooLargeError's body with its status
from core.errors.http_status. (Starlette's own limit answers in its format, not ours, and only
when the app first reads the body.)

JsonRoute (the app's route class) parses JSON bodies with orjson instead of the standard
library's json: it refuses, as invalid JSON (422 naming the character), what json.loads lets
through to fail later as a 500 or a bare 400: nesting deeper than 1024 (json recurses until
RecursionError), NaN and numbers beyond a double (infinity, which JSON cannot answer with),
integers of thousands of digits, lone UTF-16 surrogates (unencodable strings that break the
prediction log) and a byte-order mark. It is also several times faster.

The number of rows per /predict is a different limit (max_request_rows), checked with the rows
(serving/schemas.validate_rows).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import http_status
from serving.errors import RequestTooLargeError


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None:
            if length > self.max_bytes:
                await self._refuse(scope, receive, send, f"{length} bytes")
            else:  # the server stops the body at Content-Length: nothing more can come
                await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, f"more than {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message | None = {"type": "http.request", "body": b"".join(chunks)}

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        error = RequestTooLargeError(
            f"the request body ({size}) is above the limit of {self.max_bytes} bytes "
            "(setting max_request_bytes)"
        )
        response = JSONResponse(error.body(), status_code=http_status(error))
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:  # the server refuses such a request before it gets here
                return None
    return None


class _OrjsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            # orjson.JSONDecodeError is a json.JSONDecodeError: FastAPI answers it as a 422.
            self._json = orjson.loads(await self.body())
        return self._json


class JsonRoute(APIRoute):
    """An APIRoute whose request bodies parse with orjson (see the module docstring)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parse_with_orjson(request: Request) -> Response:
            return await handler(_OrjsonRequest(request.scope, request.receive))

        return parse_with_orjson
