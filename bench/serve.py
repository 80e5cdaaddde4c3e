"""Benchmark: the predictor against a Feast-per-request, one-row-at-a-time baseline, same run.

Starts its own broker and Redis on free loopback ports (or, with --running, uses the stack the
SLUICE_* settings point at), applies the Feast registry, writes online rows for --entities
restaurants and zones, trains a small LightGBM model on synthetic rows and registers it. Then:

  1. HTTP load: concurrent keep-alive clients post single-row /predict requests for --seconds
     at each of --clients (8, 32, 128) against (a) `sluice serve --workers N` (default: one
     process per core; AIMD batching, one Redis round trip per batch, prediction log to Kafka)
     and (b) a baseline FastAPI app in one uvicorn process that calls Feast's
     get_online_features and LightGBM's predict for each request. Every request row is
     distinct (its distance_km never repeats), so the prediction cache cannot help here; its
     hit rate is printed to show that. Reported: throughput, p50, p99, and sluice's p99 against
     the latency objective (settings.latency_objective_ms).
  2. The prediction cache at a realistic repeat rate: requests drawn from --distinct rows by a
     Zipf law (exponent --zipf; popular restaurant/zone/order rows asked again, as an ETA
     refreshed in an app), against sluice with the cache (cache_max_bytes) and without (0),
     with the 100-tree model and with a heavier one (--heavy-trees), whose predict costs
     more than the cache's lookup.
  3. Feature read of 100 entities (every view of the service): OnlineStore.read_many (one
     pipeline; each entity's newest row and the previous one the availability contract may
     need, decoded only where the newest is not servable yet, as the predictor reads) against
     Feast's get_online_features (newest rows only), in this process.
The two servers of each comparison (sluice and the baseline; cache on and off) run side by
side and take turns: each load is --slices turns of --seconds / --slices per server, in the
order A B B A ..., so that a drift of the machine's speed during the run reaches both alike.
Ratios: for throughput sluice / baseline (higher is better), for latency sluice / baseline
(lower is better: 0.5 is half the baseline's). The load generator runs in this process, on the
same machine: with two cores, it takes CPU from both servers. Run: `python -m bench.serve`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pandas as pd
import uvloop
import yaml

from bench.load import run_load, summary, tree_cpu_s
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
    train_model(settings.models_dir, 100)


def train_model(models_dir: str, rounds: int) -> None:
    """A LightGBM model of ``rounds`` trees on synthetic rows, promoted in ``models_dir``."""
    models = ModelRegistry(models_dir)
    frame = synthetic_frame(SERVICE, 5000)
    trained = fit(frame, SERVICE, label="delivery_seconds", rounds=rounds)
    stored = models.save(trained.model_text, trained.metadata)
    models.promote(SERVICE.name, stored.version)


def row(i: int, entities: int) -> dict[str, Any]:
    """Request row i: distinct for every i (distance_km), entities spread over the range."""
    return {
        "restaurant_id": f"r{(i * 7919) % entities}",
        "zone_id": f"z{(i * 104729) % entities}",
        "distance_km": 0.5 + (i % 1_000_000) / 100_000,
        "hour_of_day": i % 24,
        "items": 1 + i % 5,
    }


def zipf_rows(distinct: int, exponent: float, n: int, entities: int, seed: int = 7) -> list[int]:
    """n request indices drawn from ``distinct`` rows, rank r with probability ~ 1 / r**exponent."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, distinct + 1, dtype=float)
    p = ranks**-exponent
    return [int(i) for i in rng.choice(distinct, size=n, p=p / p.sum())]


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


def run_server(port: int) -> None:
    """The baseline server (sluice's: python -m serving.workers)."""
    import uvicorn

    app = baseline_app(load_settings())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _hit_rate(url: str) -> float:
    """The prediction cache's hit rate since the server started, from /metrics (with several
    workers: summed over them, serving.metrics.WorkerMetrics)."""
    hits = misses = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("sluice_cache_hits_total"):
            hits += float(line.rsplit(" ", 1)[1])
        elif line.startswith("sluice_cache_misses_total"):
            misses += float(line.rsplit(" ", 1)[1])
    return hits / (hits + misses) if hits + misses else 0.0


@dataclasses.dataclass(frozen=True)
class ServerProcess:
    kind: str
    port: int
    pid: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def running_server(kind: str, config: Path, workers: int = 1) -> Iterator[ServerProcess]:
    """One server process (tree), answering /health, until the block ends."""
    port = free_port()
    # Not PROMETHEUS_MULTIPROC_DIR: importing feast (prepare) sets it in this process, and it
    # would put the servers' metrics in prometheus_client's multiprocess mode (a file per
    # metric, written on every increment).
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["SLUICE_CONFIG"] = str(config)
    if kind == "sluice":  # serving.workers: the main module each worker imports again
        command = [sys.executable, "-m", "serving.workers", "--workers", str(workers)]
    else:
        command = [sys.executable, "-m", "bench.serve", "--run-server", kind]
    process = subprocess.Popen([*command, "--port", str(port)], env=env)
    server = ServerProcess(kind, port, process.pid)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{kind} server did not start")
            time.sleep(0.3)
        time.sleep(2.0 if workers > 1 else 0.0)  # the other workers finish starting
        yield server
    finally:
        process.terminate()
        process.wait(60)


def measure_interleaved(
    servers: dict[str, ServerProcess],
    loads: list[tuple[str, int, list[bytes]]],
    args: argparse.Namespace,
) -> dict[str, dict[str, dict[str, float]]]:
    """Each (name, clients, bodies) load against every server, in --slices turns each of
    --seconds / --slices, the servers alternating (A B B A A B ...): a machine whose speed
    drifts during the run (other work, frequency, the host) moves every server's figures
    alike, where measuring one server after the other put the drift into the ratio. Bodies:
    the first share warms each server up, then each slice has rows of its own (cycled within
    a slice only if a slice answers more requests than it has rows)."""
    out: dict[str, dict[str, dict[str, float]]] = {name: {} for name in servers}
    turns = args.slices
    seconds = args.seconds / turns
    for load, clients, bodies in loads:
        share = len(bodies) // (turns + 1)
        for server in servers.values():
            uvloop.run(run_load(server.port, 2.0, clients, bodies[:share]))
        latencies: dict[str, list[float]] = {name: [] for name in servers}
        degraded = dict.fromkeys(servers, 0)
        cpu_s = dict.fromkeys(servers, 0.0)
        order = list(servers)
        for turn in range(turns):
            rows = bodies[(turn + 1) * share : (turn + 2) * share]
            for name in order if turn % 2 == 0 else order[::-1]:
                server = servers[name]
                before = tree_cpu_s(server.pid)
                errors, answered, slow = uvloop.run(run_load(server.port, seconds, clients, rows))
                cpu_s[name] += tree_cpu_s(server.pid) - before
                if errors:
                    raise RuntimeError(f"{name} {load}: {errors} requests failed")
                latencies[name] += answered
                degraded[name] += slow
        for name, server in servers.items():
            measured = summary(latencies[name], args.seconds)
            measured["degraded"] = degraded[name] / len(latencies[name])
            measured["cpu_us"] = cpu_s[name] / len(latencies[name]) * 1e6
            if server.kind == "sluice":  # cumulative: this and earlier loads
                measured["hit_rate"] = _hit_rate(server.url)
            out[name][load] = measured
    return out


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
            # as the predictor reads: as of the batch's earliest t (serving/model.py), which
            # leaves out previous rows the availability contract cannot serve then
            ("sluice", lambda: online.read_many(requests, as_of_ms=int(time.time() * 1000))),
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
    values = settings.model_dump(mode="json")
    heavy_models = str(tmp / "models-heavy")
    train_model(heavy_models, args.heavy_trees)

    def config_file(name: str, **overrides: Any) -> Path:
        path = tmp / f"bench-{name}.yaml"
        path.write_text(yaml.safe_dump(values | overrides))
        return path

    config = config_file("default")
    no_cache = config_file("no-cache", cache_max_bytes=0)
    heavy = config_file("heavy", models_dir=heavy_models)
    heavy_no_cache = config_file("heavy-no-cache", models_dir=heavy_models, cache_max_bytes=0)
    # Distinct rows: enough that no row is asked twice in a run (the cache cannot help).
    unique = [orjson.dumps({"rows": [row(i, args.entities)]}) for i in range(args.unique_rows)]
    zipf = [
        orjson.dumps({"rows": [row(i, args.entities)]})
        for i in zipf_rows(args.distinct, args.zipf, 50_000, args.entities)
    ]
    zipf_repeats = 1 - len(set(zipf)) / len(zipf)
    chunk = len(unique) // len(args.clients)  # each load its own rows
    uniform = [
        (f"uniform@{c}", c, unique[k * chunk : (k + 1) * chunk]) for k, c in enumerate(args.clients)
    ]
    main_clients = 32 if 32 in args.clients else args.clients[0]
    cached = [("zipf", main_clients, zipf)]
    workers = args.workers
    with (
        running_server("sluice", config, workers) as sluice_server,
        running_server("baseline", config) as baseline_server,
    ):
        pair = {"sluice": sluice_server, "baseline": baseline_server}
        measured = measure_interleaved(pair, uniform, args)
    sluice, baseline = measured["sluice"], measured["baseline"]
    with (
        running_server("sluice", config, workers) as cache_on,
        running_server("sluice", no_cache, workers) as cache_off,
    ):
        measured = measure_interleaved({"on": cache_on, "off": cache_off}, cached, args)
    sluice |= measured["on"]
    sluice_off = measured["off"]
    with (
        running_server("sluice", heavy, workers) as cache_on,
        running_server("sluice", heavy_no_cache, workers) as cache_off,
    ):
        measured = measure_interleaved({"on": cache_on, "off": cache_off}, cached, args)
    heavy_on, heavy_off = measured["on"]["zipf"], measured["off"]["zipf"]
    reads = measure_reads(settings, args.entities)
    objective = settings.latency_objective_ms

    load = os.getloadavg()
    print(
        f"\nmachine load (1/5/15 min) at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        f"on {os.cpu_count()} cores: ratios are measured in this run, against its own baseline"
    )
    print(
        f"\nHTTP /predict, 1 distinct row per request, {args.seconds:.0f} s per load, loopback; "
        f"sluice: {args.workers} worker process(es), baseline: 1 process; "
        f"{os.cpu_count()} cores shared with the load generator"
    )
    print(
        f"{'clients':>7} {'measure':18} {'sluice':>10} {'baseline':>10} {'ratio':>7}  "
        f"sluice p99 vs objective {objective:g} ms"
    )
    for clients in args.clients:
        ours, theirs = sluice[f"uniform@{clients}"], baseline[f"uniform@{clients}"]
        print(
            f"{clients:7d} {'throughput (req/s)':18} {ours['throughput']:10,.0f} "
            f"{theirs['throughput']:10,.0f} {ours['throughput'] / theirs['throughput']:7.2f}"
        )
        print(
            f"{'':7} {'p50 (ms)':18} {ours['p50']:10.2f} {theirs['p50']:10.2f} "
            f"{ours['p50'] / theirs['p50']:7.2f}"
        )
        verdict = "met" if ours["p99"] <= objective else "MISSED"
        print(
            f"{'':7} {'p99 (ms)':18} {ours['p99']:10.2f} {theirs['p99']:10.2f} "
            f"{ours['p99'] / theirs['p99']:7.2f}  {ours['p99'] / objective:.2f}x: {verdict}"
        )
        print(
            f"{'':7} {'server CPU/req (us)':18} {ours['cpu_us']:10.0f} {theirs['cpu_us']:10.0f} "
            f"{ours['cpu_us'] / theirs['cpu_us']:7.2f}"
        )
        print(f"{'':7} {'cache hit rate':18} {ours['hit_rate']:10.1%}  (since start)")
        print(f"{'':7} {'answers degraded':18} {ours['degraded']:10.1%}")
    for label, head, off in (
        ("100 trees", sluice["zipf"], sluice_off["zipf"]),
        (f"{args.heavy_trees} trees", heavy_on, heavy_off),
    ):
        print(
            f"\nprediction cache, model of {label}, {main_clients} clients, Zipf({args.zipf:g}) "
            f"over {args.distinct:,} distinct rows ({zipf_repeats:.0%} of requests repeat an "
            "earlier row)"
        )
        print(f"{'measure':28} {'cache on':>10} {'cache off':>10} {'ratio':>7}")
        print(
            f"{'throughput (req/s)':28} {head['throughput']:10,.0f} {off['throughput']:10,.0f} "
            f"{head['throughput'] / off['throughput']:7.2f}"
        )
        for key in ("p50", "p99"):
            print(
                f"{key + ' (ms)':28} {head[key]:10.2f} {off[key]:10.2f} {head[key] / off[key]:7.2f}"
            )
        print(f"{'hit rate':28} {head['hit_rate']:10.1%} {off['hit_rate']:10.1%}")
        print(f"{'answers degraded':28} {head['degraded']:10.1%} {off['degraded']:10.1%}")
    ours_r, feast = reads["sluice"], reads["feast"]
    print("\nfeature read, 100 entities x 3 views (12 features), in process")
    print(f"{'measure':28} {'sluice':>10} {'feast':>10} {'ratio':>7}")
    print(f"{'median (ms)':28} {ours_r[0]:10.2f} {feast[0]:10.2f} {feast[0] / ours_r[0]:7.2f}")
    print(f"{'p99 (ms)':28} {ours_r[1]:10.2f} {feast[1]:10.2f} {feast[1] / ours_r[1]:7.2f}")
    print("(feature read ratio: feast / sluice, higher is better)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[8, 32, 128], help="Concurrent clients."
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="Sluice server processes."
    )
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument(
        "--slices", type=int, default=4, help="Turns per server and load, servers alternating."
    )
    parser.add_argument("--unique-rows", type=int, default=400_000)
    parser.add_argument("--distinct", type=int, default=10_000, help="Rows of the Zipf load.")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of that load.")
    parser.add_argument(
        "--heavy-trees", type=int, default=2000, help="Trees of the cache's heavier model."
    )
    parser.add_argument("--running", action="store_true", help="Use the running stack.")
    parser.add_argument("--run-server", choices=["baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_server:
        run_server(args.port)
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
