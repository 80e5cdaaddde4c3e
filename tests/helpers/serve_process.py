"""`sluice serve` as a subprocess on 127.0.0.1 and a free port, for tests that need several
server processes (replicas sharing a registry and Redis). Stopped by its own pid."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from core.settings import Settings
from infra.stack import free_port

ROOT = Path(__file__).resolve().parents[2]


class ServeProcess:
    """One `sluice serve` replica. ``env`` adds SLUICE_* settings to the stack's (Kafka, Redis,
    state directory); the prediction log directory is the replica's own."""

    def __init__(self, settings: Settings, log_dir: Path, output: Path, env: Mapping[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = output
        environment = os.environ | {
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "SLUICE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "SLUICE_REDIS_URL": settings.redis_url,
            "SLUICE_STATE_DIR": str(settings.state_dir),
            "SLUICE_PREDICTION_LOG_DIR": str(log_dir),
            **env,
        }
        command = [sys.executable, "-c", "from cli.main import main; main()", "serve"]
        with open(output, "ab") as out:
            self.proc = subprocess.Popen(
                [*command, "--host", "127.0.0.1", "--port", str(self.port)],
                env=environment,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sluice serve exited:\n{self.output.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"sluice serve not ready:\n{self.output.read_text()}")

    def get(self, path: str, **kwargs: Any) -> Any:
        answer = httpx.get(f"{self.url}{path}", timeout=10, **kwargs)
        assert answer.status_code == 200, (path, answer.status_code, answer.text)
        return answer.json()

    def get_text(self, path: str) -> str:
        answer = httpx.get(f"{self.url}{path}", timeout=10)
        assert answer.status_code == 200, (path, answer.status_code, answer.text)
        return answer.text

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        answer = httpx.post(f"{self.url}{path}", json=body, timeout=30, **kwargs)
        assert answer.status_code == 200, (path, answer.status_code, answer.text)
        return answer.json()

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (uvicorn shuts down, the log closes), SIGKILL if that takes too long."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def start_all(processes: Sequence[ServeProcess], timeout_s: float = 90.0) -> None:
    """Wait for replicas started together (they load in parallel); stop them all on failure."""
    try:
        for process in processes:
            process.wait_ready(timeout_s)
    except BaseException:
        for process in processes:
            process.stop()
        raise
