"""Redis SIGSTOP for 10 s while `sluice serve` answers 150 requests/s (an open-loop load from a
process of its own, tests/helpers/load.py): every request answered, none beyond its deadline,
the answers during the stop flagged degraded, full service within 1 s of Redis returning;
every answer in the prediction log once, its degraded flag with it.

The Redis is the test's own (started here, stopped by pid, always continued); the broker of
the session stack only carries the prediction log.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest

from core.kafka import read_topics
from core.records import PredictionRecord
from core.settings import Settings
from examples.delivery.features import delivery_eta, zone_couriers
from feature_repo.online_store import OnlineRow, open_online_store
from features.contract import window_end_at
from serving.deadlines import ANSWER_RESERVE_S
from tests.helpers.faults import own_redis, predictor
from tests.helpers.load import (
    Outcome,
    delivery_request,
    latency_figures,
    ms_figures,
    start_load,
)
from tests.helpers.serving import random_row, trained_registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

RATE = 150.0  # requests/s, one row each
WARM_S, STOP_S, AFTER_S = 3.0, 10.0, 4.0
DEADLINE_MS = 250
# The deadline is the server's promise from the moment its route starts handling a request;
# each prediction record carries that time (latency_ms), checked for every record. On this
# shared 2-core machine (load averages of 10-19 while these tests ran) the server is
# sometimes not scheduled for long enough that requests queue in its event loop and the
# deadline's timer fires late (see test_fault_prediction_log.py), so late answers are counted
# and printed, and the test fails when more than LATE_SHARE of them are late by more than
# SERVER_SLACK_MS: requests that waited for the stopped Redis (or a read timeout per batch on
# top of their deadline) would make every answer of the stop late, 59% of the run.
SERVER_SLACK_MS = 50
LATE_SHARE = 0.25
# Before the stop a row is degraded only when the server spent its whole budget on it (the
# deadline's answer; under the other test worker's Flink jobs the server's p99 before the
# stop has reached 316 ms): at most this share of the rows before the stop.
STARVED_SHARE = 0.05
RESERVE_MS = ANSWER_RESERVE_S * 1000
# Client-side answers beyond the deadline plus SLACK_S (the connection, uvicorn's parsing
# before the route's clock starts, the machine) are reported; asserted on the client side:
# every request answered, 200, within CLIENT_TIMEOUT_S (a request held by the stopped Redis
# for its 10 s would not be).
SLACK_S = 0.15
CLIENT_TIMEOUT_S = 5.0
RECOVERY_S = 1.0
RESTAURANTS = [f"r{i:03d}" for i in range(20)]
ZONES = [f"z{i}" for i in range(5)]
VIEWS = [v.name for v in delivery_eta.views]


def write_rows(settings: Settings) -> None:
    """Every entity has a row of the window due now: undegraded answers carry window ends."""
    rng = random.Random(7)
    now = int(time.time() * 1000)
    with open_online_store(settings) as store:
        for view in delivery_eta.views:
            keys = ZONES if view is zone_couriers else RESTAURANTS
            end = window_end_at(view, now) - view.slide_ms
            store.write(view, [OnlineRow(key, end, random_row(view, rng)) for key in keys])


def degraded(outcome: Outcome) -> list[str]:
    assert outcome.degraded is not None, outcome
    return outcome.degraded


def test_redis_sigstop_under_load_answers_within_deadlines(
    stack_settings: Settings, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    with own_redis(tmp_path) as (redis_proc, redis_url):
        settings = stack_settings.model_copy(
            update={
                "redis_url": redis_url,
                "feast_project": f"fault_{run}",
                "models_dir": str(tmp_path / "models"),
                "prediction_topic": f"test.predictions.fault.{run}",
                "feedback_topic": f"test.feedback.fault.{run}",
            }
        )
        write_rows(settings)
        trained_registry(tmp_path / "models", delivery_eta)
        env = {
            "SLUICE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "SLUICE_REDIS_URL": redis_url,
            "SLUICE_STATE_DIR": str(tmp_path / "state"),
            "SLUICE_FEAST_PROJECT": settings.feast_project,
            "SLUICE_MODELS_DIR": settings.models_dir,
            "SLUICE_SERVE_MODELS": "delivery_eta",
            "SLUICE_PREDICTION_TOPIC": settings.prediction_topic,
            "SLUICE_FEEDBACK_TOPIC": settings.feedback_topic,
            # The defaults, spelt out: what the figures below were measured with.
            "SLUICE_REDIS_READ_TIMEOUT_MS": "100",
            "SLUICE_BREAKER_FAILURES": "3",
            "SLUICE_BREAKER_OPEN_MS": "500",
        }
        with predictor(env, tmp_path / "serve.log") as url:
            # Warm up (model, connections), then check that Redis is really being read.
            warm = httpx.post(f"{url}/predict", json=delivery_request(0), timeout=10)
            assert warm.status_code == 200, warm.text
            assert warm.json()["predictions"][0]["degraded"] == []
            load = start_load(
                f"{url}/predict",
                rate=RATE,
                duration_s=WARM_S + STOP_S + AFTER_S,
                timeout_s=CLIENT_TIMEOUT_S,
                out=tmp_path / "load.json",
                headers={"X-Request-Timeout-Ms": str(DEADLINE_MS)},
            )
            try:
                load.at(WARM_S)
                os.kill(redis_proc.pid, signal.SIGSTOP)
                stopped_at = time.monotonic()
                load.at(WARM_S + STOP_S)
                os.kill(redis_proc.pid, signal.SIGCONT)
                continued_at = time.monotonic()
                shots = load.join()
            finally:
                load.stop()
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            health = httpx.get(f"{url}/health", timeout=10).json()

    unanswered = [s for s in shots if s.status != 200]
    late = [s for s in shots if (s.latency_s or 0) > DEADLINE_MS / 1000 + SLACK_S]
    before = [s for s in shots if s.started < stopped_at - 0.5]
    # Sent and answered while Redis was stopped (one sent just before SIGCONT may be read after).
    during = [
        s for s in shots if stopped_at < s.started and s.started + (s.latency_s or 0) < continued_at
    ]
    after = [s for s in shots if s.started >= continued_at + RECOVERY_S]
    recovering = [s for s in shots if continued_at <= s.started < continued_at + RECOVERY_S]
    answered = [s for s in shots if s.status == 200]
    first_full = min(
        (s.started - continued_at for s in recovering + after if s.degraded == []), default=None
    )
    records = [
        PredictionRecord.decode(m.value())
        for m in read_topics(settings, [settings.prediction_topic], limit=len(shots) + 1)
    ]
    logged = {r.prediction_id: r for r in records}
    server_late = [r for r in records if r.latency_ms > DEADLINE_MS + SERVER_SLACK_MS]
    by_reason = {
        line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("sluice_degraded_rows_total{")
    }
    print(
        f"\nRedis SIGSTOP {continued_at - stopped_at:.2f} s under {RATE:g} req/s, "
        f"deadline {DEADLINE_MS} ms: sent {len(shots)}, answered 200 {len(answered)}; "
        f"during the stop {sum(s.status == 200 for s in during)} answered, "
        f"{sum(s.degraded == VIEWS for s in during)} degraded (rows by reason {by_reason}); "
        f"first undegraded answer "
        f"{first_full if first_full is None else round(first_full, 3)} s after SIGCONT; "
        f"client-side beyond the deadline + {SLACK_S:g} s: {len(late)}; server-side beyond "
        f"the deadline + {SERVER_SLACK_MS} ms: {len(server_late)} of {len(records)} records"
    )
    for name, group in (("before", before), ("during", during), ("after", after)):
        ids = {s.prediction_id for s in group}
        server_ms = [r.latency_ms for r in records if r.prediction_id in ids]
        print(f"  {name:6s} client {latency_figures(group)}; server {ms_figures(server_ms)}")

    # Every request sent was answered, 200 (within the client's timeout), the server within
    # the request's deadline (see LATE_SHARE).
    assert unanswered == [], (len(unanswered), unanswered[:5])
    assert len(server_late) <= LATE_SHARE * len(records), [r.latency_ms for r in server_late]
    # Redis cannot answer while stopped: every row then is degraded, every view flagged.
    assert all(degraded(s) == VIEWS for s in during), [
        (round(s.started - stopped_at, 3), s.latency_s, s.degraded)
        for s in during
        if degraded(s) != VIEWS
    ][:5]
    # Redis up: no row is degraded, except where the server could not finish the row within
    # its deadline at all (a starved machine; logged with the whole budget spent, answered
    # "deadline" as the server promises) - those are few, and none is answered early.
    starved = [
        s
        for s in before
        if degraded(s) and logged[str(s.prediction_id)].latency_ms >= DEADLINE_MS - RESERVE_MS
    ]
    assert sum(bool(degraded(s)) for s in before) == len(starved), [
        (round(s.started - stopped_at, 3), s.latency_s, logged[str(s.prediction_id)].latency_ms)
        for s in before
        if degraded(s)
    ][:10]
    assert len(starved) <= STARVED_SHARE * len(before), [
        (round(s.started - stopped_at, 3), s.lag_s, logged[str(s.prediction_id)].latency_ms)
        for s in starved
    ]
    # Full service within RECOVERY_S of Redis returning.
    assert all(degraded(s) == [] for s in after), [
        (round(s.started - continued_at, 3), degraded(s)) for s in after if degraded(s)
    ][:10]

    # The breaker opened, and closed again by itself.
    assert health["feature_store"] == "closed"
    assert 'sluice_breaker_transitions_total{to="open"}' in metrics
    assert "sluice_breaker_state 0.0" in metrics

    # The prediction log: every answer once, with its degraded flag.
    flags = {str(s.prediction_id): degraded(s) for s in shots}
    answered_warm = 1
    assert len(records) == len(logged) == len(flags) + answered_warm
    assert all((logged[pid].degraded or []) == found for pid, found in flags.items())
    assert sum(by_reason.values()) == sum(1 for found in flags.values() if found)
