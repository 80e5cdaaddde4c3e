"""The pipeline is domain-agnostic: a second domain defined only in tests
(tests/domains/payments.py: card payments and fraud labels) runs through the real CLI, in
subprocesses, on a stack of its own, with no change to product code: raw JSON -> `sluice
ingest` -> `features apply` -> `backfill` -> `stream --until` -> `train` -> `serve` -> POST
/predict answers."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from core.kafka import CountingProducer, ensure_topics
from core.settings import load_settings
from events.history import SourceEvent, write_history
from infra.stack import free_port
from tests.domains.payments import FRAUD_LABELS, PAYMENTS

pytestmark = [pytest.mark.integration, pytest.mark.spark, pytest.mark.flink, pytest.mark.slow]
SLUICE = str(Path(sys.executable).parent / "sluice")
DOMAIN = "tests.domains.payments"
PAYMENT_COUNT, MALFORMED, ORPHAN_LABELS = 1200, 3, 4
CARDS, MERCHANTS, STOLEN = 24, 6, {"c00", "c01", "c02"}
_ = r"[\s│|]+"  # between two cells of a printed table


def sluice(env: dict[str, str], *args: str, expect: int = 0, timeout: float = 240) -> str:
    proc = subprocess.run(
        [SLUICE, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    output = f"sluice {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == expect, output
    return proc.stdout + proc.stderr


def simulate(start_ms: int, seed: int = 11) -> tuple[list[SourceEvent], list[SourceEvent]]:
    """Payments every 2 s over 40 minutes, and a verdict on each 5 minutes later. Stolen cards
    spend more, in bursts, in the second half; most of their large payments are fraud."""
    rng = random.Random(seed)
    payments, verdicts = [], []
    for i in range(PAYMENT_COUNT):
        t = start_ms + i * 2_000
        late = i > PAYMENT_COUNT // 2
        card = rng.choice(sorted(STOLEN)) if late and rng.random() < 0.3 else None
        card = card or f"c{rng.randrange(CARDS):02d}"
        amount = round(rng.uniform(5, 80) * (6 if card in STOLEN else 1), 2)
        payment: dict[str, Any] = {
            "payment_id": f"p{i:05d}",
            "card_id": card,
            "merchant_id": f"m{rng.randrange(MERCHANTS)}",
            "amount": amount,
            "paid_at": t,
        }
        payments.append(SourceEvent("payments", card, t, payment))
        fraud = rng.random() < (0.8 if card in STOLEN and amount > 150 else 0.02)
        verdicts.append(_verdict(payment["payment_id"], card, t, fraud))
    for i in range(ORPHAN_LABELS):  # verdicts on payments the history does not hold
        verdicts.append(_verdict(f"x{i}", "c03", start_ms + i * 60_000, False))
    return payments, verdicts


def _verdict(payment_id: str, card: str, paid_at: int, fraud: bool) -> SourceEvent:
    at = paid_at + 300_000
    payload = {
        "payment_id": payment_id,
        "card_id": card,
        "paid_at": paid_at,
        "is_fraud": fraud,
        "labelled_at": at,
    }
    return SourceEvent("fraud_labels", payment_id, at, payload)


def test_a_second_domain_runs_through_the_cli_unchanged(tmp_path: Path) -> None:
    models_port = free_port()
    env = os.environ | {
        "SLUICE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "SLUICE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "SLUICE_STATE_DIR": str(tmp_path / "state"),
        "SLUICE_HISTORY_DIR": str(tmp_path / "history"),
        "SLUICE_OFFLINE_STORE_DIR": str(tmp_path / "offline"),
        "SLUICE_FEAST_REGISTRY": str(tmp_path / "registry.db"),
        "SLUICE_FEAST_PROJECT": "payments_test",
        "SLUICE_MODELS_DIR": str(tmp_path / "models"),
        "SLUICE_SERVE_MODELS": '["payment_fraud"]',
        "SLUICE_SPARK_MASTER": "local[2]",
        "SLUICE_DEFINITIONS_MODULE": DOMAIN,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "COLUMNS": "200",
    }
    settings = load_settings(
        kafka_bootstrap=env["SLUICE_KAFKA_BOOTSTRAP"], history_dir=tmp_path / "history"
    )
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    start_ms = int((now - timedelta(hours=2)).timestamp() * 1000)
    payments, verdicts = simulate(start_ms)
    serve: subprocess.Popen[bytes] | None = None
    sluice(env, "up")
    try:
        # The domain has no `produce` hook: the CLI says so in one line.
        out = sluice(env, "produce", "--events", "10", expect=9)
        assert f"the domain {DOMAIN} defines no `produce` hook" in out
        assert "Traceback" not in out

        # Its producers publish raw JSON; a few payments are malformed (negative amounts).
        ensure_topics(settings, [PAYMENTS.raw_topic, FRAUD_LABELS.raw_topic])
        producer = CountingProducer(settings)
        for i, event in enumerate(payments):
            payload = event.payload | ({"amount": -1.0} if i < MALFORMED else {})
            producer.produce(PAYMENTS.raw_topic, orjson.dumps(payload), event.key)
        for event in verdicts:
            producer.produce(FRAUD_LABELS.raw_topic, event.to_json(), event.key)
        producer.flush()
        # The history holds the intact events, like an archive of the event topics.
        write_history(
            payments[MALFORMED:] + verdicts, settings.history_dir, [PAYMENTS, FRAUD_LABELS]
        )

        out = sluice(env, "ingest", "--idle-timeout", "5")
        total = len(payments) + len(verdicts)
        valid = total - MALFORMED
        assert f"{total} in = {valid} valid + {MALFORMED} dead-lettered (balanced)" in out, out

        sluice(env, "features", "apply")
        first = datetime.fromtimestamp(start_ms / 1000, UTC).date()
        last_ms = payments[-1].event_time_ms
        last = datetime.fromtimestamp(last_ms / 1000, UTC).date()
        out = sluice(
            env, "backfill", "--start", first.isoformat(), "--end", str(last + timedelta(days=2))
        )
        for view in ("card_spend", "merchant_payments"):  # events read, offline rows
            assert re.search(rf"{view}{_}\d+{_}[1-9]\d*", out), out

        until = datetime.fromtimestamp((last_ms + 1_000) / 1000, UTC).isoformat()
        out = sluice(env, "stream", "--until", until, "--fresh", "--report-every", "5")
        # view, events, aggregated, filtered, late, rejected, rows
        streamed = re.search(rf"card_spend{_}(\d+){_}(\d+){_}0{_}0{_}0{_}(\d+)", out)
        assert streamed, out
        events, aggregated, rows = map(int, streamed.groups())
        assert events == aggregated == PAYMENT_COUNT - MALFORMED, out
        assert rows > 0, out

        out = sluice(env, "train", "--rounds", "30")
        assert re.search(
            rf"labels fraud: {PAYMENT_COUNT - MALFORMED} rows from {len(verdicts)} fraud_labels "
            rf"events \({ORPHAN_LABELS + MALFORMED} without a match in payments by payment_id\)",
            out,
        ), out
        assert re.search(rf"payment_fraud{_}1{_}", out), out

        log = tmp_path / "serve.log"
        with log.open("wb") as sink:
            serve = subprocess.Popen(
                [SLUICE, "serve", "--port", str(models_port)],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        base = f"http://127.0.0.1:{models_port}"
        _wait_healthy(base, serve, log)
        newest = payments[-1].payload
        row = {
            "card_id": newest["card_id"],
            "merchant_id": newest["merchant_id"],
            "amount": newest["amount"],
            "hour_of_day": datetime.fromtimestamp(last_ms / 1000, UTC).hour,
        }
        answer = httpx.post(
            f"{base}/predict", json={"model": "payment_fraud", "rows": [row]}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        prediction = answer.json()["predictions"][0]
        assert isinstance(prediction["prediction"], float)
        assert prediction["model_version"] == 1
        # Both views have online rows (the stream's and the backfill's); values may be null.
        assert not {"card_spend", "merchant_payments"} & set(prediction["missing"]), prediction
        bad = httpx.post(f"{base}/predict", json={"rows": [row | {"hour_of_day": 24}]}, timeout=30)
        assert bad.status_code == 422, bad.text
        assert "hour_of_day" in bad.text
    finally:
        if serve is not None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait(timeout=30)
        sluice(env, "down")


def _wait_healthy(base: str, serve: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert serve.poll() is None, log.read_text()
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the predictor did not answer /health:\n{log.read_text()}")
