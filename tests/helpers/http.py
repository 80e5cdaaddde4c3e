"""A real HTTP server for an ASGI app, in a thread on 127.0.0.1 (for clients that need a
socket, such as tritonclient)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from infra.stack import free_port


@contextmanager
def served_in_thread(app: Any, timeout_s: float = 60.0) -> Iterator[str]:
    """Run ``app`` (its lifespan included) with uvicorn until the block ends; yields
    "127.0.0.1:<port>"."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
