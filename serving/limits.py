"""The request body limit: a pure ASGI middleware that answers 413 before anything parses.

A body whose Content-Length is above ``max_request_bytes`` is refused without reading a byte
of it. A body without Content-Length (chunked) is read up to the limit and refused as soon as
it passes it, so a client cannot make the server hold more than the limit either way; what it
sent is then replayed to the app. The answer is RequestTooLargeError's body with its status
from core.errors.http_status. (Starlette's own limit answers in its format, not ours, and only
when the app first reads the body.)

The number of rows per /predict is a different limit (max_request_rows), checked with the rows
(serving/schemas.validate_rows).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
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
