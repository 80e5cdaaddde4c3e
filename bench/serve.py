"""Benchmark: the predictor against a Feast-per-request, one-row-at-a-time baseline, same run.

Starts its own broker and Redis on free loopback ports (or, with --running, uses the stack the
SLUICE_* settings point at), applies the Feast registry, writes online rows for --entities
restaurants and zones, trains a small LightGBM model on synthetic rows and registers it. Then:

  1. HTTP load: concurrent async httpx clients post single-row /predict requests for
     --seconds against (a) `sluice serve` (AIMD batching, one Redis round trip per batch,
     prediction log to Kafka) and (b) a baseline FastAPI app that calls Feast's
     get_online_features and LightGBM's predict for each request. Each server runs alone
     in its own uvicorn process; the load generator runs here. Reported: throughput and p50/p99.
  2. Feature read of 100 entities (every view of the service): OnlineStore.read_many (one
     pipeline; each entity's newest row and the previous one the availability contract may
     need) against Feast's get_online_features (newest rows only), in this process.
Ratios: for throughput sluice / baseline (higher is better), for latency baseline / sluice
(higher is better: how many times faster). Run: `python -m bench.serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pandas as pd
import yaml

from core.settings import Settings, load_settings
from examples.delivery.features import delivery_eta
from feature_repo import registry_ops
from feature_repo.config import feature_store
from feature_repo.online_store import OnlineRow, open_online_store
from features.contract import window_end_at
from features.definitions import FeatureService, FeatureView
from features.registry import load_registry
from features.schema import FieldType
from infra.stack import free_port, stack_down, stack_up
from models.fit import fit, model_features
from models.registry import ModelRegistry

SERVICE = delivery_eta


def synthetic_frame(service: FeatureService, n: int, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame: dict[str, Any] = {"event_timestamp": np.arange(n) * 60_000}
    label = np.full(n, 600.0)
    for ref, column in model_features(service):
        if ref.startswith("order_request:"):
            continue
        frame[column] = rng.gamma(2.0, 3.0, n)
        label += frame[column] * rng.uniform(1, 10)
    frame["distance_km"] = rng.uniform(0.2, 12, n)
    frame["hour_of_day"] = rng.integers(0, 24, n)
    frame["items"] = rng.integers(1, 8, n)
    frame["delivery_seconds"] = label + frame["distance_km"] * 120 + rng.normal(0, 60, n)
    return pd.DataFrame(frame)


def online_values(view: FeatureView, rng: np.random.Generator) -> dict[str, Any]:
    return {
        s.name: int(rng.integers(0, 30)) if s.dtype is FieldType.INT else float(rng.gamma(2, 3))
        for s in view.features()
    }


def prepare(settings: Settings, entities: int) -> None:
    registry_ops.apply(settings, load_registry(settings.definitions_module))
    rng = np.random.default_rng(5)
    now = int(time.time() * 1000)
    with open_online_store(settings) as online:
        for view in SERVICE.views:
            prefix = "z" if view.entity.join_key == "zone_id" else "r"
            # Two windows per entity, the newest the one due now (features/contract.py), so
            # that reads carry the previous row as the stream leaves them.
            due = window_end_at(view, now)
            for end in (due - view.slide_ms, due):
                rows = [
                    OnlineRow(f"{prefix}{i}", end, online_values(view, rng))
                    for i in range(entities)
                ]
                online.write(view, rows)
    models = ModelRegistry(settings.models_dir)
    trained = fit(synthetic_frame(SERVICE, 5000), SERVICE, label="delivery_seconds", rounds=100)
    stored = models.save(trained.model_text, trained.metadata)
    models.promote(SERVICE.name, stored.version)


def row(i: int, entities: int) -> dict[str, Any]:
    return {
        "restaurant_id": f"r{(i * 7919) % entities}",
        "zone_id": f"z{(i * 104729) % entities}",
        "distance_km": 0.5 + i % 10,
        "hour_of_day": i % 24,
        "items": 1 + i % 5,
    }


# --- the baseline server: Feast per request, one row at a time --------------------------------


def baseline_app(settings: Settings) -> Any:
    import lightgbm as lgb
    from fastapi import FastAPI

    store = feature_store(settings)
    models = ModelRegistry(settings.models_dir)
    version = models.production(SERVICE.name)
    assert version is not None
    meta = models.metadata(SERVICE.name, version)
    booster = lgb.Booster(model_str=models.model_text(SERVICE.name, version))
    view_refs = [r for r in meta.features if not r.startswith("order_request:")]
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(body: dict[str, Any]) -> dict[str, Any]:
        out = []
        for request_row in body["rows"]:
            entity = {
                "restaurant_id": request_row["restaurant_id"],
                "zone_id": request_row["zone_id"],
            }
            got = store.get_online_features(features=view_refs, entity_rows=[entity]).to_dict()
            vector = []
            for ref in meta.features:
                group, _, name = ref.partition(":")
                value = request_row[name] if group == "order_request" else got[name][0]
                vector.append(np.nan if value is None else float(value))
            prediction = float(booster.predict(np.array([vector]), num_threads=1)[0])
            out.append({"prediction": prediction, "model_version": version})
        return {"predictions": out}

    return app


def run_server(kind: str, port: int) -> None:
    import uvicorn

    from serving.app import create_app

    settings = load_settings()
    app = create_app(settings) if kind == "sluice" else baseline_app(settings)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- load generation ------------------------------------------------------------------------


class _Connection:
    """A bare keep-alive HTTP/1.1 client: httpx costs more CPU per request than the servers
    measured here, and on two cores the load generator must stay cheap."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def post(self, host: str, path: str, body: bytes) -> int:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return int(status_line.split()[1])


async def _load(
    port: int, seconds: float, concurrency: int, entities: int
) -> tuple[int, list[float]]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    bodies = [orjson.dumps({"rows": [row(i, entities)]}) for i in range(4096)]

    async def worker(offset: int) -> None:
        nonlocal errors
        connection = _Connection(*await asyncio.open_connection("127.0.0.1", port))
        i = offset
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            status = await connection.post(f"127.0.0.1:{port}", "/predict", bodies[i % len(bodies)])
            if status != 200:
                errors += 1
            else:
                latencies.append(time.perf_counter() - started)
            i += concurrency
        connection.writer.close()

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return errors, latencies


def measure_server(kind: str, config: Path, args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    env = os.environ | {"SLUICE_CONFIG": str(config)}
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.serve", "--run-server", kind, "--port", str(port)], env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{kind} server did not start")
            time.sleep(0.3)
        asyncio.run(_load(port, 2.0, args.concurrency, args.entities))  # warm-up
        errors, latencies = asyncio.run(_load(port, args.seconds, args.concurrency, args.entities))
        if errors:
            raise RuntimeError(f"{kind}: {errors} requests failed")
        batch = ""
        if kind == "sluice":
            batch = httpx.get(f"{url}/models").json()["serving"][SERVICE.name]["batch_size"]
    finally:
        process.terminate()
        process.wait(30)
    ms = sorted(x * 1000 for x in latencies)
    return {
        "throughput": len(ms) / args.seconds,
        "p50": ms[len(ms) // 2],
        "p99": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "batch": float(batch or 0),
    }


def measure_reads(
    settings: Settings, entities: int, n: int = 100, repeats: int = 200
) -> dict[str, tuple[float, float]]:
    keys = [row(i, entities) for i in range(n)]
    refs = [f"{v.name}:{s.name}" for v in SERVICE.views for s in v.features()]
    entity_rows = [{"restaurant_id": k["restaurant_id"], "zone_id": k["zone_id"]} for k in keys]
    requests = [(v, [k[v.entity.join_key] for k in keys]) for v in SERVICE.views]
    store = feature_store(settings)
    out: dict[str, tuple[float, float]] = {}
    with open_online_store(settings) as online:
        for name, call in (
            ("sluice", lambda: online.read_many(requests)),
            (
                "feast",
                lambda: store.get_online_features(features=refs, entity_rows=entity_rows).to_dict(),
            ),
        ):
            for _ in range(20):
                call()
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                call()
                times.append((time.perf_counter() - started) * 1000)
            times.sort()
            out[name] = (statistics.median(times), times[int(len(times) * 0.99) - 1])
    return out


def run(settings: Settings, args: argparse.Namespace, tmp: Path) -> None:
    prepare(settings, args.entities)
    config = tmp / "bench.yaml"
    values = settings.model_dump(mode="json")
    config.write_text(yaml.safe_dump(values))
    sluice = measure_server("sluice", config, args)
    baseline = measure_server("baseline", config, args)
    reads = measure_reads(settings, args.entities)

    print(
        f"\nHTTP /predict, 1 row per request, {args.concurrency} concurrent clients, "
        f"{args.seconds:.0f} s each, loopback; latency objective {settings.latency_objective_ms} ms"
    )
    print(f"{'measure':28} {'sluice':>10} {'baseline':>10} {'ratio':>7}")
    print(
        f"{'throughput (req/s)':28} {sluice['throughput']:10,.0f} {baseline['throughput']:10,.0f} "
        f"{sluice['throughput'] / baseline['throughput']:7.2f}"
    )
    for key in ("p50", "p99"):
        print(
            f"{key + ' latency (ms)':28} {sluice[key]:10.2f} {baseline[key]:10.2f} "
            f"{baseline[key] / sluice[key]:7.2f}"
        )
    print(f"(sluice AIMD batch size at the end: {sluice['batch']:.0f})")
    ours, feast = reads["sluice"], reads["feast"]
    print("\nfeature read, 100 entities x 3 views (12 features)")
    print(f"{'measure':28} {'sluice':>10} {'feast':>10} {'ratio':>7}")
    print(f"{'median (ms)':28} {ours[0]:10.2f} {feast[0]:10.2f} {feast[0] / ours[0]:7.2f}")
    print(f"{'p99 (ms)':28} {ours[1]:10.2f} {feast[1]:10.2f} {feast[1] / ours[1]:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--running", action="store_true", help="Use the running stack.")
    parser.add_argument("--run-server", choices=["sluice", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_server:
        run_server(args.run_server, args.port)
        return
    with tempfile.TemporaryDirectory(prefix="sluice-bench-serve-") as name:
        tmp = Path(name)
        overrides: dict[str, Any] = {
            "feast_project": "bench_serve",
            "feast_registry": tmp / "registry.db",
            "offline_store_dir": tmp / "offline",
            "models_dir": str(tmp / "models"),
            "serve_models": [SERVICE.name],
            "prediction_topic": "bench.predictions",
        }
        if args.running:
            run(load_settings(**overrides), args, tmp)
            return
        settings = load_settings(
            kafka_bootstrap=f"127.0.0.1:{free_port()}",
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
            state_dir=tmp / "stack",
            **overrides,
        )
        stack_up(settings)
        try:
            run(settings, args, tmp)
        finally:
            stack_down(settings)


if __name__ == "__main__":
    main()
