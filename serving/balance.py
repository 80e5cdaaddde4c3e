"""Connections balanced over the workers of ``sluice serve --workers N``, by counts.

The workers accept from one listening socket that the supervisor binds. Left alone, a burst of
new connections goes to whichever worker wakes first, and it accepts them all (measured with
bench.serve's 8 keep-alive clients: all 8 on one of two workers). Each worker's own
SO_REUSEPORT socket spreads them by a hash instead: 8 connections split 4/4 only 27% of the
time, 6/2 or worse 29%, and a keep-alive client stays where the hash put it.

So a worker accepts only while it holds no more connections than the least loaded live worker,
and stops watching the socket otherwise (nginx's ``accept_mutex`` idea; Envoy's "exact"
connection balance does it by handing connections over). Counts are published in a small
shared file (``ConnectionBoard``, in the server's metrics directory): per worker slot the open
connections and a heartbeat. A worker whose heartbeat is older than ``STALE_S`` is dead (or
stuck) and does not count, so a worker that dies never holds the others back; its connections
were reset with it. A paused worker looks again every ``TICK_S``: connections it holds may
close, and others accept. At most one worker is ahead of the fewest by one connection at a
time, up to the races between two workers' reads, which a tick corrects.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import multiprocess

from serving.metrics import WORKERS_DIR_ENV

BOARD_FILE = "connections.board"
TICK_S = 0.005  # a paused worker looks at the counts again after this long
STALE_S = 1.0  # a worker that has not ticked for this long is not counted
# An accept that fails for want of resources (descriptors, buffers) is retried after this long.
RESOURCE_RETRY_S = 0.1
_HEADER = struct.Struct("<q")  # the number of worker slots
_SLOT = struct.Struct("<qq")  # per slot: open connections, heartbeat (monotonic ns)

log = logging.getLogger("sluice.serving.balance")


class ConnectionBoard:
    """Open connections per worker slot, shared by the workers through a memory-mapped file.

    Each worker writes only its own slot; a torn read is impossible for aligned 8-byte values
    on the platforms this runs on, and a stale one is corrected at the next tick."""

    def __init__(self, path: Path) -> None:
        with path.open("r+b") as file:
            self._map = mmap.mmap(file.fileno(), 0)
        (self.slots,) = _HEADER.unpack_from(self._map, 0)

    @staticmethod
    def create(path: Path, slots: int) -> None:
        """The supervisor's part: a board of ``slots`` empty slots."""
        path.write_bytes(_HEADER.pack(slots) + bytes(_SLOT.size * slots))

    def publish(self, slot: int, connections: int) -> None:
        _SLOT.pack_into(self._map, _HEADER.size + slot * _SLOT.size, connections, _now_ns())

    def fewest_elsewhere(self, slot: int) -> int | None:
        """The fewest connections of another live worker; None when no other is live."""
        fewest: int | None = None
        oldest = _now_ns() - int(STALE_S * 1e9)
        for other in range(self.slots):
            if other == slot:
                continue
            connections, heartbeat = _SLOT.unpack_from(self._map, _HEADER.size + other * _SLOT.size)
            if heartbeat >= oldest and (fewest is None or connections < fewest):
                fewest = connections
        return fewest

    def close(self) -> None:
        self._map.close()


def _now_ns() -> int:
    return time.monotonic_ns()  # CLOCK_MONOTONIC: one clock for every process of the machine


class BalancedListener:
    """Accepts from the shared socket while this worker is not ahead of the others, and hands
    each connection to ``create_protocol`` on the event loop; stands in for the asyncio server
    uvicorn would make (``close`` and ``wait_closed``)."""

    def __init__(
        self,
        sock: socket.socket,
        protocol_class: Any,
        protocol_arguments: dict[str, Any],
        connections: set[Any],
        board: ConnectionBoard,
        slot: int,
        backlog: int,
    ) -> None:
        self._sock = sock
        counted = _counting(protocol_class, self._on_closed)
        self._create_protocol: Callable[[], asyncio.Protocol] = lambda: counted(
            **protocol_arguments
        )
        self._connections = connections  # uvicorn's: a protocol is in it from connection_made
        self._board = board
        self._slot = slot
        self._loop = asyncio.get_running_loop()
        self._starting: set[asyncio.Task[Any]] = set()  # accepted, protocol not made yet
        self._watching = False
        self._closed = False
        self._tick: asyncio.TimerHandle | None = None
        sock.listen(backlog)  # the supervisor only bound it (uvicorn's Config.bind_socket)
        sock.setblocking(False)
        self._on_tick()

    def _held(self) -> int:
        return len(self._connections) + len(self._starting)

    def _may_accept(self) -> bool:
        if self._slot >= self._board.slots:
            return True  # not on the board (startup's warning): accepts as uvicorn would
        held = self._held()
        self._board.publish(self._slot, held)
        fewest = self._board.fewest_elsewhere(self._slot)
        return fewest is None or held <= fewest

    def _watch(self, on: bool) -> None:
        if on != self._watching:
            if on:
                self._loop.add_reader(self._sock.fileno(), self._on_readable)
            else:
                self._loop.remove_reader(self._sock.fileno())
            self._watching = on

    def _on_tick(self) -> None:
        if self._closed:
            return
        self._watch(self._may_accept())
        self._tick = self._loop.call_later(
            TICK_S if not self._watching else 10 * TICK_S, self._on_tick
        )

    def _on_closed(self) -> None:
        """A connection of this worker closed: tell the others at once (a paused worker may
        now accept), and accept again if this worker is now among the fewest."""
        if not self._closed:
            self._watch(self._may_accept())

    def _on_readable(self) -> None:
        while self._may_accept():
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:  # the client gave up while queued
                    continue
                # Out of descriptors or buffers: stop watching (a level-triggered socket would
                # wake the loop again at once) and let the tick try again a little later.
                log.warning("accept failed, retrying shortly: %s", exc)
                self._watch(False)
                if self._tick is not None:
                    self._tick.cancel()
                self._tick = self._loop.call_later(RESOURCE_RETRY_S, self._on_tick)
                return
            task = self._loop.create_task(self._start(conn))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)
        self._watch(False)

    async def _start(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await self._loop.connect_accepted_socket(self._create_protocol, conn)
        except OSError as exc:  # reset before it was set up: nothing to serve
            log.info("connection lost before it was set up: %s", exc)
            conn.close()

    def close(self) -> None:
        """Stop accepting (uvicorn's shutdown); the connections made are uvicorn's to close."""
        self._closed = True
        if self._tick is not None:
            self._tick.cancel()
        self._watch(False)

    async def wait_closed(self) -> None:
        if self._starting:
            await asyncio.gather(*self._starting, return_exceptions=True)


def _counting(protocol_class: Any, on_closed: Callable[[], None]) -> Any:
    """``protocol_class`` that calls ``on_closed`` once a connection is lost (and out of
    uvicorn's connections)."""

    class Counting(protocol_class):  # type: ignore[misc]
        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            on_closed()

    return Counting


class BalancedServer(uvicorn.Server):
    """uvicorn's Server, accepting through a BalancedListener when it is a worker of
    ``balanced_workers``; its startup otherwise, and its shutdown, are uvicorn's."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        directory = os.environ.get(WORKERS_DIR_ENV)
        if not sockets or not directory:
            await super().startup(sockets)
            return
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)
        config = self.config
        # What uvicorn's startup makes each connection's protocol with.
        arguments = {
            "config": config,
            "server_state": self.server_state,
            "app_state": self.lifespan.state,
        }
        from serving.workers import claim_slot

        board = ConnectionBoard(Path(directory) / BOARD_FILE)
        # A slot of this server's board (the prediction log's slots are per log directory,
        # which several servers may share); a dead worker's slot is free for its successor.
        slot = claim_slot(Path(directory) / "board")
        if slot >= board.slots:  # more workers alive at once than the board holds
            log.warning("worker slot %d beyond the board's %d: not balanced", slot, board.slots)
        # uvicorn's shutdown calls close() and wait_closed() on these, as on asyncio servers.
        listeners: list[Any] = [
            BalancedListener(
                sock,
                config.http_protocol_class,
                arguments,
                self.server_state.connections,
                board,
                slot,
                config.backlog,
            )
            for sock in sockets
        ]
        self.servers = listeners
        self.started = True


class BalancedProcess(multiprocess.Process):
    """uvicorn's worker process, running a BalancedServer (pickled to the spawned worker)."""

    @property
    def server(self) -> BalancedServer:
        if not isinstance(self._server, BalancedServer):
            self._server = BalancedServer(config=self.config)
        return self._server


@contextlib.contextmanager
def balanced_workers(directory: Path, workers: int) -> Iterator[None]:
    """While in the block, uvicorn's supervisor (``Multiprocess``) starts workers that balance
    their connections through a board in ``directory`` (the server's metrics directory, named
    to the workers by its environment variable).

    uvicorn makes a worker's ``Server`` in ``Process.server`` and names ``Process`` in four
    places of its supervisor, with no setting for either; so the supervisor module's ``Process``
    is replaced by a subclass for the block, in this (the supervisor's) process only."""
    # Twice the workers: uvicorn's restart brings a replacement up before the old one leaves.
    ConnectionBoard.create(directory / BOARD_FILE, 2 * workers)
    module: Any = multiprocess
    saved = module.Process
    module.Process = BalancedProcess
    try:
        yield
    finally:
        module.Process = saved
