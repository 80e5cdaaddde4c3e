"""The dashboard server: the page (monitoring/page.py), its JSON and the monitor's metrics.

GET /              the page
GET /api/summary   MonitorState.snapshot(): every panel's series, drift per feature, alerts
GET /metrics       the monitor's Prometheus metrics
GET /health        {"status": "ok"}

``DashboardServer`` runs it with uvicorn in a thread of the monitor's process (127.0.0.1 by
default: settings.monitor_host / monitor_port).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from monitoring.errors import MonitorError
from monitoring.metrics import MonitorMetrics
from monitoring.page import PAGE
from monitoring.state import MonitorState


def create_dashboard(state: MonitorState, metrics: MonitorMetrics | None = None) -> FastAPI:
    app = FastAPI(title="Sluice monitor", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/api/summary")
    async def summary() -> JSONResponse:
        return JSONResponse(state.snapshot())

    @app.get("/metrics")
    async def prometheus() -> Response:
        if metrics is None:
            return Response("", media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    return app


class DashboardServer:
    """uvicorn serving the dashboard in a daemon thread; ``stop()`` ends it."""

    def __init__(
        self,
        state: MonitorState,
        metrics: MonitorMetrics | None,
        host: str,
        port: int,
    ) -> None:
        import uvicorn

        config = uvicorn.Config(
            create_dashboard(state, metrics),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.host, self.port = host, port
        self._thread = threading.Thread(
            target=self.server.run, name="sluice-dashboard", daemon=True
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise MonitorError(
                    f"the dashboard could not listen on {self.host}:{self.port} (is the port "
                    "taken? set monitor_port or --port)"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=5)
