"""Run the predictor as one server process, or as N (``sluice serve --workers N``).

One Python process serves on one core (the event loop, JSON, the prediction log all hold the
GIL), so on a machine with several cores N processes answer up to N times as much. uvicorn's
supervisor starts them and restarts a worker that dies; each one builds its own app from the
same settings: the environment and SLUICE_CONFIG, which serve() sets from the config file the
command was given.

The workers accept from one socket the supervisor binds, and each accepts only while it holds
no more connections than the least loaded of the others (serving/balance.py): keep-alive
clients, which stay on the worker that accepted them, end up spread evenly. A worker that dies
takes its connections with it (reset; the clients reconnect to the others); the connections
waiting to be accepted are the others' to take.

Per process:
- the prediction log's write-ahead directory (serving/wal.py locks it for one process): worker
  k writes to ``<prediction_log_dir>/worker-<k>``, k the lowest slot no running worker holds
  (claimed with a lock on ``worker-<k>.claim``), so a restarted worker takes over the records
  its predecessor left unsent, and a restart with fewer workers leaves higher slots' records
  on disk until a run with as many workers again;
- Prometheus metrics: each worker counts its own, and publishes them every half second in the
  server's metrics directory (a temporary directory serve() makes and removes); the worker
  that answers a scrape of /metrics sums every worker's counters and histograms there and
  lists gauges per worker (serving.metrics.WorkerMetrics).
- what serving/ keeps in memory: batches form per process (AIMD per process), the prediction
  cache is per process, /feedback's recent-predictions lookup reaches the predictions of the
  process that answers it (the feedback consumer joins the others through the log). Policy
  state and rollouts are shared through Redis already (rollout_bus "redis"; "local" reaches
  one process only).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from core.errors import UsageError
from core.settings import Settings, load_settings
from serving.metrics import WORKERS_DIR_ENV

MAX_WORKERS = 256
HEALTHCHECK_S = 60
_claimed: list[int] = []  # the claim's file descriptor, held for the process's life


def log_root(settings: Settings) -> Path:
    return settings.prediction_log_dir or settings.state_dir / "prediction-log"


def claim_slot(root: Path) -> int:
    """The lowest worker slot under ``root`` no live process holds; held until exit."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(MAX_WORKERS):
        fd = os.open(root / f"worker-{k}.claim", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _claimed.append(fd)
        return k
    raise UsageError(f"more than {MAX_WORKERS} predictor workers share {root}")


def worker_settings(settings: Settings) -> Settings:
    """The settings of one worker process: its own prediction log directory."""
    return _claimed_settings(settings)[0]


def _claimed_settings(settings: Settings) -> tuple[Settings, int]:
    root = log_root(settings)
    slot = claim_slot(root)
    return settings.model_copy(update={"prediction_log_dir": root / f"worker-{slot}"}), slot


def worker_app() -> FastAPI:
    """uvicorn's factory in each worker process (``serving.workers:worker_app``)."""
    from serving.app import create_app

    settings, slot = _claimed_settings(load_settings())
    app = create_app(settings)
    directory = os.environ.get(WORKERS_DIR_ENV)
    if directory:  # /metrics answers for every worker (serving.metrics.WorkerMetrics)
        app.state.worker_metrics = (Path(directory), str(slot))
    return app


def serve(
    settings: Settings, host: str, port: int, workers: int = 1, config: Path | None = None
) -> None:
    """Serve until stopped: in this process (workers=1) or in ``workers`` processes."""
    import uvicorn

    if workers <= 1:
        from serving.app import create_app

        app = create_app(settings)
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
        return
    if workers > MAX_WORKERS:
        raise UsageError(f"--workers: at most {MAX_WORKERS}, got {workers}")
    if config is not None:  # the workers load the same settings
        os.environ["SLUICE_CONFIG"] = str(config.resolve())
    # The server's metrics directory: each worker publishes its metrics there, and the one
    # answering a scrape sums them (serving.metrics.WorkerMetrics). Made here, removed on exit.
    metrics_dir = tempfile.mkdtemp(prefix="sluice-serve-metrics-")
    os.environ[WORKERS_DIR_ENV] = metrics_dir
    try:
        _run_workers(uvicorn, host, port, workers)
    finally:
        os.environ.pop(WORKERS_DIR_ENV, None)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _run_workers(uvicorn: Any, host: str, port: int, workers: int) -> None:
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(
        "serving.workers:worker_app",
        factory=True,
        workers=workers,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        # A worker answers the supervisor's pings once it has imported what it runs; on a
        # loaded machine that can take longer than uvicorn's 5 s, and it would be restarted
        # again and again.
        timeout_worker_healthcheck=HEALTHCHECK_S,
    )
    from serving.balance import balanced_workers

    # Bound and listening here, so that a port already taken fails at start and not in every
    # worker; each worker accepts from it (serving/balance.py).
    sock = config.bind_socket()
    try:
        with balanced_workers(Path(os.environ[WORKERS_DIR_ENV]), workers):
            Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()


def main() -> None:
    """``python -m serving.workers --port P --workers N``: serve with settings from the
    environment (bench/serve.py starts the predictor so: a light main module, which each
    spawned worker imports again)."""
    import argparse

    parser = argparse.ArgumentParser(description="Run the predictor (see serving/workers.py).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    serve(load_settings(), args.host, args.port, args.workers)


if __name__ == "__main__":
    main()
