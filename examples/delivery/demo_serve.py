"""The demo's last steps: train models, serve them, send requests, show the prediction log."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from core.kafka import read_topics
from core.records import FeedbackRecord, PredictionRecord
from core.settings import Settings
from infra.stack import free_port

MODEL = "delivery_eta"
_SHOWN = ("prediction_id", "time_ms", "model", "model_version", "prediction", "latency_ms")
SINGLE_REQUESTS = 64  # concurrent one-row requests: the batcher groups them


def train_serve_and_predict(settings: Settings, console: Console) -> None:
    from batch.train import print_train_report, train_models

    console.rule("11. sluice train: point-in-time training sets (Spark) -> LightGBM -> registry")
    report = train_models(settings, promote=True)
    print_train_report(console, report, settings.models_dir)

    labels = report.label_rows[0].frame  # the delivery_times declaration's rows
    newest = labels.sort_values("event_timestamp").tail(8)
    columns = ["restaurant_id", "zone_id", "distance_km", "hour_of_day", "items"]
    rows: list[dict[str, Any]] = [
        {c: (v.item() if hasattr(v, "item") else v) for c, v in zip(columns, values, strict=True)}
        for values in newest[columns].itertuples(index=False)
    ]
    actual = [float(v) for v in newest["delivery_seconds"]]

    console.rule("12. sluice serve: the predictor on 127.0.0.1 (uvicorn)")
    server, thread, base = _start_server(settings)
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            answer = client.post("/predict", json={"model": MODEL, "rows": rows})
            answer.raise_for_status()
            predictions = answer.json()["predictions"]
            _show_predictions(console, rows, predictions, actual)
            bad = client.post("/predict", json={"model": MODEL, "rows": [rows[0] | {"items": 0}]})
            console.print(f"a bad request: {bad.status_code} {bad.json()['detail']}")
            for prediction, label in zip(predictions, actual, strict=True):
                sent = {"prediction_id": prediction["prediction_id"], "label": label}
                client.post("/feedback", json=sent).raise_for_status()
        sizes = asyncio.run(_concurrent_singles(base, rows))
        console.print(
            f"{SINGLE_REQUESTS} concurrent one-row requests answered; adaptive batches of "
            f"up to {max(sizes)} rows (batch size gauge after the burst)"
        )
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    console.print("predictor stopped (its prediction log flushed on shutdown)")

    console.rule(f"13. the prediction log ({settings.prediction_topic}) and feedback")
    # Decoding checks every record against its schema (a bad one stops the demo, named).
    logged = [
        PredictionRecord.decode(m.value())
        for m in read_topics(settings, [settings.prediction_topic], idle_timeout_s=2.0)
    ]
    feedback = [
        FeedbackRecord.decode(m.value())
        for m in read_topics(settings, [settings.feedback_topic], idle_timeout_s=2.0)
    ]
    expected = len(rows) + SINGLE_REQUESTS
    console.print(
        f"{len(logged)} prediction records (expected at least {expected} from this run), "
        f"{len(feedback)} feedback records"
    )
    if logged:
        record = logged[-1]
        shown = {k: getattr(record, k) for k in _SHOWN}
        console.print(f"one record: {shown} ... features: {len(record.features)}")
    if len(logged) < expected or len(feedback) < len(rows):
        raise SystemExit(1)


def _start_server(settings: Settings) -> tuple[Any, threading.Thread, str]:
    import uvicorn

    from serving.app import create_app

    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    # Not the main thread, so uvicorn leaves the signal handlers alone.
    thread = threading.Thread(target=server.run, name="demo-predictor", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit("the predictor did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


async def _concurrent_singles(base: str, rows: list[dict[str, Any]]) -> list[int]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        answers = await asyncio.gather(
            *(
                client.post("/predict", json={"model": MODEL, "rows": [rows[i % len(rows)]]})
                for i in range(SINGLE_REQUESTS)
            )
        )
        for answer in answers:
            answer.raise_for_status()
        metrics = (await client.get("/metrics")).text
    sizes = [
        int(float(line.rsplit(" ", 1)[1]))
        for line in metrics.splitlines()
        if line.startswith("sluice_batch_size") and not line.startswith("#")
    ]
    return sizes or [1]


def _show_predictions(
    console: Console,
    rows: list[dict[str, Any]],
    predictions: list[dict[str, Any]],
    actual: list[float],
) -> None:
    # Fits 80 columns: ids and numbers never wrap or get cut; the ages cell wraps between views.
    views = list(predictions[0]["feature_ages_ms"]) if predictions else []
    table = Table(
        caption=f"in minutes; feature ages of {', '.join(views)} (-: no online row)",
        caption_justify="left",
    )
    for header in ("restaurant", "zone"):
        table.add_column(header, no_wrap=True)
    for header in ("km", "items", "predicted", "actual", "ver"):
        table.add_column(header, no_wrap=True, justify="right")
    table.add_column("feature ages", overflow="fold", min_width=8)
    for row, answer, label in zip(rows, predictions, actual, strict=True):
        ages = answer["feature_ages_ms"]
        missing = set(answer["missing"])
        table.add_row(
            row["restaurant_id"],
            row["zone_id"],
            f"{row['distance_km']:.1f}",
            str(row["items"]),
            f"{answer['prediction'] / 60:.1f}",
            f"{label / 60:.1f}",
            str(answer["model_version"]),
            ", ".join(
                "-" if view in missing or ages[view] is None else str(round(ages[view] / 60_000))
                for view in views
            ),
        )
    console.print(table)
