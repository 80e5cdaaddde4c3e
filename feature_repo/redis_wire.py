"""Redis's wire protocol for the online store's reads: commands packed by hand, replies parsed by
hiredis, over redis-py's blocking connections (``read_replies``) or an asyncio connection of the
event loop's own (``RedisPipe``).

Why an asyncio connection: the predictor's batches read Redis once each. Done in a thread, every
batch pays two thread hand-overs (the executor's queue and the loop's wake-up), and both take
the GIL from the event loop: measured with py-spy's --gil at 8 clients, a fifth of the GIL's
time went to ``ThreadPoolExecutor.submit`` and the future's ``call_soon_threadsafe``. On the
loop, a read is a write and the replies arrive as the loop's own I/O, and a stuck Redis does not
stall the loop: the read's timeout is asyncio's, and on a timeout the connection is dropped
(its replies may still arrive), as the blocking path disconnects.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Sequence
from typing import Any

import redis

try:  # redis-py's hiredis parser (serves replies from hiredis' C reader), when installed
    import hiredis
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NO_DATA
    from redis._parsers.hiredis import _HiredisParser
except ImportError:  # pragma: no cover - without hiredis: read_response, and no RedisPipe
    hiredis = None  # type: ignore[assignment]
    _HiredisParser = None  # type: ignore[assignment,misc]
    _NO_DATA = object()


def resp_array_head(length: int) -> bytes:
    return b"*%d\r\n" % length


def resp_bulk(data: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(data), data)


def resp_command(*args: bytes | str) -> bytes:
    parts = [arg.encode() if isinstance(arg, str) else arg for arg in args]
    return resp_array_head(len(parts)) + b"".join(map(resp_bulk, parts))


def read_replies(connection: Any, count: int) -> list[Any]:
    """``count`` replies from a connection that was sent as many commands.

    With hiredis (redis-py's parser when it is installed, as here) the replies are taken from
    its reader directly, one C call each, the socket read through redis-py's parser (its
    timeout and error mapping): redis-py's read_response costs more per reply than Redis
    takes to answer an HMGET. Otherwise, read_response per reply."""
    parser = connection._parser
    reader = getattr(parser, "_reader", None)
    if (
        _HiredisParser is None
        or not isinstance(parser, _HiredisParser)
        or reader is None
        or getattr(parser, "_next_response", None) is not _NO_DATA  # a reply read ahead
    ):
        return [connection.read_response() for _ in range(count)]
    gets = reader.gets
    fill: Any = parser.read_from_socket  # redis-py leaves it untyped
    replies: list[Any] = []
    append = replies.append
    while len(replies) < count:
        reply = gets()
        if reply is _NO_DATA:  # not all of it has arrived yet
            try:
                fill()
            # As redis-py's read_response does: its parser raises the socket's own errors.
            except TimeoutError as exc:  # socket.timeout (an OSError)
                raise redis.TimeoutError(f"Timeout reading from socket: {exc}") from None
            except OSError as exc:
                raise redis.ConnectionError(f"Error reading from socket: {exc}") from None
            continue
        if isinstance(reply, Exception):  # an error reply (WRONGTYPE...), or hiredis' own
            raise reply if isinstance(reply, redis.RedisError) else redis.ResponseError(reply)
        append(reply)
    return replies


class _Call:
    __slots__ = ("count", "future", "replies")

    def __init__(self, count: int, future: asyncio.Future[list[Any]]) -> None:
        self.count = count
        self.future = future
        self.replies: list[Any] = []


class _Protocol(asyncio.Protocol):
    """Replies, in order, to the calls sent on one connection (Redis answers in order)."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(notEnoughData=_NO_DATA)
        self.calls: collections.deque[_Call] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's or uvloop's (which does not derive from asyncio.Transport); both write.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        calls, gets = self.calls, self.reader.gets
        while calls:
            reply = gets()
            if reply is _NO_DATA:
                return
            call = calls[0]
            call.replies.append(reply)
            if len(call.replies) == call.count:
                calls.popleft()
                if not call.future.done():  # a caller that timed out is gone
                    call.future.set_result(call.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = redis.ConnectionError(f"Redis closed the connection: {exc or 'EOF'}")
        while self.calls:
            future = self.calls.popleft().future
            if not future.done():
                future.set_exception(self.lost)


class RedisPipe:
    """One asyncio connection to Redis, of the event loop that first uses it: pipelined calls
    of packed commands, replies in order. Errors are redis-py's (TimeoutError,
    ConnectionError, ResponseError), as the blocking path raises them."""

    def __init__(self, connection_kwargs: dict[str, Any], timeout_s: float | None) -> None:
        self._kwargs = connection_kwargs
        self.timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @staticmethod
    def supported(pool: redis.ConnectionPool) -> bool:
        """hiredis is there and the pool speaks plain TCP or a unix socket (not TLS)."""
        kind = pool.connection_class
        return hiredis is not None and kind in (redis.Connection, redis.UnixDomainSocketConnection)

    async def call(self, commands: bytes, count: int) -> list[Any]:
        """Send packed commands and return their ``count`` replies (an error reply raises).

        Reads are idempotent: a connection that was open before the call and turns out
        closed (Redis restarted) is replaced and the call sent once more, as the blocking
        path does. A timeout is not retried (the predictor's deadline counts on one)."""
        connect_timeout = self._kwargs.get("socket_connect_timeout")
        for attempt in (1, 2):
            reused = self._protocol is not None and self._protocol.lost is None
            protocol = await asyncio.wait_for(self._connected(), connect_timeout)
            future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            protocol.calls.append(_Call(count, future))
            assert protocol.transport is not None
            protocol.transport.write(commands)
            try:
                replies = await asyncio.wait_for(future, self.timeout_s)
            except TimeoutError:
                self.drop()  # replies may still arrive on it
                raise redis.TimeoutError(
                    f"Timeout reading from Redis ({self.timeout_s} s)"
                ) from None
            except redis.ConnectionError:
                if not reused or attempt == 2:
                    raise
                continue
            for reply in replies:
                if isinstance(reply, Exception):
                    raise (
                        reply if isinstance(reply, redis.RedisError) else redis.ResponseError(reply)
                    )
            return replies
        raise AssertionError("unreachable")

    async def _connected(self) -> _Protocol:
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            # Another event loop (the last one ended: tests, a restarted app): its connection
            # went with it.
            self._protocol = self._connecting = None
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect())
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        self._loop = loop
        kw = self._kwargs
        try:
            if kw.get("path"):
                _, protocol = await loop.create_unix_connection(_Protocol, kw["path"])
            else:
                _, protocol = await loop.create_connection(
                    _Protocol, kw.get("host", "localhost"), kw.get("port", 6379)
                )
        except OSError as exc:
            raise redis.ConnectionError(f"Error connecting to Redis: {exc}") from None
        setup: list[bytes] = []
        if kw.get("password"):
            user = kw.get("username")
            setup.append(resp_command("AUTH", *([user] if user else []), kw["password"]))
        if kw.get("db"):
            setup.append(resp_command("SELECT", str(kw["db"])))
        self._protocol = protocol
        if setup:
            future: asyncio.Future[list[Any]] = loop.create_future()
            protocol.calls.append(_Call(len(setup), future))
            assert protocol.transport is not None
            protocol.transport.write(b"".join(setup))
            for reply in await future:
                if isinstance(reply, Exception):
                    self.drop()
                    raise redis.ConnectionError(f"Redis refused the connection: {reply}")
        return protocol

    def drop(self) -> None:
        """Abort the connection; the next call opens a new one."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            with contextlib.suppress(RuntimeError):  # its event loop has closed already
                protocol.transport.abort()

    def close(self) -> None:
        """Close the connection: from its loop's thread, or from another while it runs."""
        loop = self._loop
        if loop is not None and loop.is_running() and not _in(loop):
            loop.call_soon_threadsafe(self.drop)
        else:
            self.drop()


def _in(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def pairs(reply: Sequence[Any]) -> dict[Any, Any]:
    """A RESP2 HGETALL reply (field, value, field, value, ...) as a dict."""
    return dict(zip(reply[::2], reply[1::2], strict=True))
