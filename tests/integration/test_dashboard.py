"""The monitor's dashboard in a real browser (Debian's chromium, headless, driven over the
DevTools protocol with the websockets client): during a short live run (the predictor's batch
step on real Redis, its records to a real broker, the monitor with Spark for skew), the page
loads, every panel shows data (the cache panel a note: this predictor has no cache), and the
browser logs no console error."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.kafka import CountingProducer, ensure_topics
from core.records import FeedbackRecord
from core.settings import Settings
from examples.delivery.features import delivery_eta
from infra.stack import free_port
from monitoring.dashboard import DashboardServer
from monitoring.metrics import MonitorMetrics
from monitoring.runner import MonitorSummary, run_monitor
from monitoring.state import MonitorState
from serving.model import PredictItem, load_model, predict_batch
from tests.helpers.stream import patient_store
from tests.integration.test_monitor import (
    RESTAURANTS,
    ZONES,
    log_record,
    monitor_settings,
    train_versions,
    write_window_rows,
)

pytestmark = [pytest.mark.integration, pytest.mark.spark, pytest.mark.slow]
PANELS = (
    "latency",
    "batch",
    "throughput",
    "cache",
    "freshness",
    "behind",
    "drift",
    "skew",
    "mae",
    "traffic",
)
LIVE_S = 14.0
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
)


def live_traffic(settings: Settings, stop: threading.Event) -> int:
    """Predictions at the wall clock, logged and half answered with feedback, until stop."""
    rng = random.Random(3)
    models = {
        v: load_model(
            settings_registry(settings), {"delivery_eta": delivery_eta}, "delivery_eta", v
        )
        for v in (1, 2)
    }
    producer = CountingProducer(settings)
    sent = 0
    with patient_store(settings) as store:
        while not stop.is_set():
            items = [
                PredictItem(
                    models[1 if rng.random() < 0.7 else 2],
                    {
                        "restaurant_id": rng.choice(RESTAURANTS),
                        "zone_id": rng.choice(ZONES),
                        "distance_km": round(rng.uniform(0.5, 8), 3),
                        "hour_of_day": 12,
                        "items": rng.randint(1, 6),
                    },
                )
                for _ in range(rng.randint(5, 40))
            ]
            started = time.perf_counter()
            answers = predict_batch(store, items)
            latency = (time.perf_counter() - started) * 1000
            for item, answer in zip(items, answers, strict=True):
                record = log_record(answer, dict(item.row), latency * rng.uniform(1, 3))
                producer.produce(settings.prediction_topic, record.encode(), record.prediction_id)
                if rng.random() < 0.5:
                    label = FeedbackRecord(
                        record.prediction_id,
                        record.prediction + rng.gauss(0, 50),
                        int(time.time() * 1000),
                    )
                    producer.produce(settings.feedback_topic, label.encode(), label.prediction_id)
            sent += len(items)
            producer.poll(0)
            time.sleep(0.05)
    producer.flush(30)
    return sent


def settings_registry(settings: Settings) -> Any:
    from models.registry import ModelRegistry

    return ModelRegistry(settings.models_dir)


class Browser:
    """One headless chromium page over the DevTools protocol; console errors collected."""

    def __init__(self, tmp: Path) -> None:
        from websockets.sync.client import connect

        executable = shutil.which("chromium")
        assert executable, "chromium is not installed (infra/bootstrap.sh installs it with apt)"
        port = free_port()
        self.process = subprocess.Popen(
            [
                executable,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={tmp / 'profile'}",
                f"--remote-debugging-port={port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        pages: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not pages:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=1).json()
                pages = [t for t in targets if t.get("type") == "page"]
            except httpx.HTTPError:
                time.sleep(0.2)
        assert pages, "chromium's DevTools endpoint did not answer"
        self._stack = contextlib.ExitStack()
        self.socket = self._stack.enter_context(
            connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
        )
        self.next_id = 0
        self.errors: list[str] = []
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")

    def _event(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append(json.dumps(params.get("args"))[:300])
        elif method == "Runtime.exceptionThrown":
            self.errors.append(json.dumps(params.get("exceptionDetails"))[:300])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            self.errors.append(json.dumps(params["entry"])[:300])

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=30))
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                result: dict[str, Any] = message.get("result", {})
                return result
            self._event(message)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def close(self) -> None:
        self._stack.close()
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    browser = Browser(tmp_path)
    try:
        yield browser
    finally:
        browser.close()


def test_every_panel_shows_data_from_a_live_run(
    stack_settings: Settings, spark: Any, tmp_path: Path, browser: Browser
) -> None:
    settings = monitor_settings(
        stack_settings,
        tmp_path,
        "dashboard",
        monitor_period_s=2.0,
        monitor_grace_s=0.5,
        monitor_min_rows=20,
        monitor_skew_sample=0.3,
    )
    now = int(time.time() * 1000)
    write_window_rows(spark, settings, now)
    train_versions(spark, settings, label_start_ms=now - 60_000)
    ensure_topics(settings, [settings.prediction_topic, settings.feedback_topic])

    state = MonitorState(settings.monitor_period_s)
    metrics = MonitorMetrics()
    server = DashboardServer(state, metrics, "127.0.0.1", free_port())
    server.start()
    stop_traffic, stop_monitor = threading.Event(), threading.Event()
    summary: list[MonitorSummary] = []
    monitor = threading.Thread(
        target=lambda: summary.append(
            run_monitor(settings, stop=stop_monitor, state=state, metrics=metrics)
        )
    )
    monitor.start()
    sent: list[int] = []
    traffic = threading.Thread(target=lambda: sent.append(live_traffic(settings, stop_traffic)))
    traffic.start()
    try:
        browser.call("Page.navigate", url=server.url)
        deadline = time.monotonic() + LIVE_S + 90
        states: dict[str, str] = {}
        stopped_at = time.monotonic() + LIVE_S
        while time.monotonic() < deadline:
            if time.monotonic() > stopped_at:
                stop_traffic.set()
            time.sleep(1.0)
            found = browser.evaluate(
                "JSON.stringify(Array.from(document.querySelectorAll('section[id^=panel-]'))"
                ".map(s => [s.id.slice(6), s.dataset.state, Number(s.dataset.points || 0)]))"
            )
            states = {name: state for name, state, _ in json.loads(found or "[]")}
            wanted = {name: "note" if name == "cache" else "data" for name in PANELS}
            if states == wanted:
                break
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            width=1300,
            height=1500,
            deviceScaleFactor=1,
            mobile=False,
        )
        time.sleep(0.5)
        shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        import base64

        (tmp_path / "dashboard.png").write_bytes(base64.b64decode(shot["data"]))
        assert states == {name: "note" if name == "cache" else "data" for name in PANELS}, states
        note = browser.evaluate("document.querySelector('#panel-cache .note').textContent")
        assert "cache" in note
        svg_points = browser.evaluate("document.querySelectorAll('circle.point').length")
        bars = browser.evaluate("document.querySelectorAll('rect.bar').length")
        assert svg_points > 20
        assert bars >= len(delivery_eta.feature_refs())
        assert int(browser.evaluate("document.body.dataset.updates")) >= 2  # it polls
        assert browser.errors == []
    finally:
        stop_traffic.set()
        traffic.join(timeout=60)
        until = time.monotonic() + 30
        while sent and state.consumed["predictions"] < sent[0] and time.monotonic() < until:
            time.sleep(0.2)
        stop_monitor.set()
        monitor.join(timeout=120)
        server.stop()
    assert sent[0] > 200
    assert summary[0].consumed["predictions"] == sent[0]
