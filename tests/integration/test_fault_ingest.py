"""Fuzzed events through the real broker and a `sluice ingest` subprocess: random bytes, truncated
JSON, huge numbers, wrong types, deep nesting, 1 MiB payloads and tombstones beside good orders.
Every record the broker accepted is forwarded (the good ones) or dead-lettered once with the
reason the validator gives it; the counts balance; ingest does not crash and its peak RSS stays
bounded."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from core.kafka import PRODUCER_DEFAULTS, ensure_topics
from core.records import DeadLetter, is_heartbeat
from core.settings import Settings
from features.validation import EventValidator, Rejection, RejectReason
from tests.helpers.fuzz_definitions import orders
from tests.helpers.stream import read_all

pytestmark = pytest.mark.integration
SLUICE = str(Path(sys.executable).parent / "sluice")
MiB = 1 << 20
# Peak RSS of the ingest process above that of an ingest that reads nothing (interpreter,
# imports, clients). The records hold ~69 MiB of large payloads (60 of 1 MiB, 30 of 300 KB);
# ingest's own bounds (16 MiB prefetch, 8 MiB per poll) allow ~24 MiB plus allocator slack.
# Measured +19 MiB (131 MiB peak over a 112 MiB base); holding the payloads fails this.
MAX_GROWTH_MIB = 48
# How often the peak is sampled. /proc's VmHWM is the process's own high-water mark since its
# exec, so sampling only has to be fast enough to read it before the process exits. (wait4's
# ru_maxrss is not usable: Linux carries the parent's high-water mark across fork + exec.)
SAMPLE_S = 0.05
KINDS = (
    "good",
    "random_bytes",
    "truncated",
    "huge_number",
    "huge_int",
    "huge_string",
    "wrong_type",
    "deep_nesting",
    "megabyte",
    "megabyte",
    "tombstone",
    "null_field",
    "missing_field",
)
# What each kind must end as (random bytes are only known to be rejected).
EXPECTED = {
    "truncated": RejectReason.INVALID_JSON,
    "huge_number": RejectReason.INVALID_JSON,
    "huge_int": RejectReason.OUT_OF_RANGE,
    "huge_string": RejectReason.TOO_LARGE,
    "wrong_type": RejectReason.WRONG_TYPE,
    "deep_nesting": RejectReason.INVALID_JSON,
    "megabyte": RejectReason.TOO_LARGE,
    "tombstone": RejectReason.INVALID_JSON,
    "null_field": RejectReason.NULL_FIELD,
    "missing_field": RejectReason.MISSING_FIELD,
}


def good_order(i: int, now_ms: int) -> dict[str, Any]:
    return {
        "order_id": f"o-{i}",
        "restaurant_id": f"r-{i % 7}",
        "zone_id": "z01",
        "items": 1 + i % 5,
        "subtotal": 12.5 + i,
        "distance_km": 2.5,
        "placed_at": now_ms - 60_000 + i,
    }


def fuzzed(kind: str, i: int, rng: random.Random, now_ms: int) -> bytes | None:
    doc = good_order(i, now_ms)
    raw = orjson.dumps(doc)
    if kind == "good":
        return raw
    if kind == "random_bytes":
        return rng.randbytes(rng.randrange(1, 400))
    if kind == "truncated":
        return raw[: rng.randrange(1, len(raw))]
    if kind == "huge_number":
        return raw[:-1] + b',"subtotal":1e999}'
    if kind == "huge_int":
        return orjson.dumps(doc | {"items": 2**64 - 1})
    if kind == "huge_string":
        return orjson.dumps(doc | {"zone_id": "z" * 300_000})
    if kind == "wrong_type":
        return orjson.dumps(doc | {"items": rng.choice(["3", [3], {"n": 3}, True, 2.5])})
    if kind == "deep_nesting":
        return raw[:-1] + b',"extra":' + b"[" * 5000 + b"]" * 5000 + b"}"
    if kind == "megabyte":
        return orjson.dumps(doc | {"zone_id": "z" * MiB})
    if kind == "tombstone":
        return None
    if kind == "null_field":
        return orjson.dumps(doc | {"subtotal": None})
    assert kind == "missing_field"
    return orjson.dumps({k: v for k, v in doc.items() if k != "zone_id"})


def peak_rss_mib(pid: int) -> float | None:
    """The process's RSS high-water mark (VmHWM), or None once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) / 1024 if match else None


def run_measured(argv: list[str], env: dict[str, str], log: Path) -> tuple[float, str]:
    """Run argv to its end (90 s at most; exit code 0 required): its peak RSS and output."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    peak = 0.0
    try:
        deadline = time.monotonic() + 90
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"{argv[1]} did not finish within 90 s"
            peak = max(peak, peak_rss_mib(proc.pid) or 0.0)
            time.sleep(SAMPLE_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait(timeout=10)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert peak > 0, "no RSS sample taken"
    return peak, text


def test_fuzzed_events_are_dead_lettered_with_reasons(stack_settings: Settings, tmp_path: Path):
    tag = uuid.uuid4().hex[:8]
    settings = stack_settings.model_copy(update={"dead_letter_topic": f"fuzz-{tag}.dead-letter"})
    ensure_topics(settings, [orders.raw_topic, orders.topic, settings.dead_letter_topic])
    rng = random.Random(14)
    now_ms = int(time.time() * 1000)
    # The broker may refuse what the producer hands over; that is counted, never assumed.
    producer = Producer(
        settings.kafka_client_config(**PRODUCER_DEFAULTS, **{"message.max.bytes": 4 * MiB})
    )
    sent: dict[str, tuple[str, bytes | None]] = {}
    delivered: set[str] = set()
    refused: Counter[str] = Counter()

    def report(err: Any, msg: Any) -> None:
        key = msg.key().decode()
        if err is None:
            delivered.add(key)
        else:
            refused[err.name()] += 1

    for i in range(390):
        kind = KINDS[i % len(KINDS)]
        key = f"{tag}-{i}"
        value = fuzzed(kind, i, rng, now_ms)
        sent[key] = (kind, value)
        producer.produce(orders.raw_topic, value, key, on_delivery=report)
        producer.poll(0)
    assert producer.flush(60) == 0
    assert len(delivered) + sum(refused.values()) == len(sent), "every record has a report"

    env = {k: v for k, v in os.environ.items() if k != "PYFLINK_GATEWAY_DISABLED"} | {
        "SLUICE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "SLUICE_REDIS_URL": settings.redis_url,
        "SLUICE_STATE_DIR": str(tmp_path),
        "SLUICE_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
        "SLUICE_DEFINITIONS_MODULE": "tests.helpers.fuzz_definitions",
        "SLUICE_INGEST_HEARTBEAT_MS": "0",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "COLUMNS": "200",
    }
    # The base: the same command stopping before its first record (--max-events 0).
    base_mib, _ = run_measured(
        [SLUICE, "ingest", "--max-events", "0", "--group", f"fuzz-{tag}-base"],
        env,
        tmp_path / "base.log",
    )
    peak_mib, text = run_measured(
        [SLUICE, "ingest", "--idle-timeout", "3", "--group", f"fuzz-{tag}"],
        env,
        tmp_path / "ingest.log",
    )
    print(
        f"ingest peak RSS {peak_mib:.0f} MiB over a base of {base_mib:.0f} MiB; "
        f"broker refused {dict(refused) or 'none'}"
    )
    assert peak_mib - base_mib < MAX_GROWTH_MIB, f"ingest peak RSS {peak_mib:.0f} MiB"

    validator = EventValidator(orders, settings.ingest_max_event_bytes)
    want_dead: dict[str, RejectReason] = {}
    want_good: set[bytes] = set()
    for key in delivered:
        kind, value = sent[key]
        outcome = (
            validator.validate(value, now_ms=now_ms)
            if value is not None
            else Rejection(RejectReason.INVALID_JSON, None, "tombstone")
        )
        if isinstance(outcome, Rejection):
            assert kind != "good", outcome
            assert EXPECTED.get(kind, outcome.reason) is outcome.reason, (kind, outcome)
            want_dead[key] = outcome.reason
        else:
            assert kind == "good", (kind, value)
            want_good.add(outcome.to_json())
    match = re.search(r"(\d+) in = (\d+) valid \+ (\d+) dead-lettered \(balanced\)", text)
    assert match, text
    assert tuple(map(int, match.groups())) == (len(delivered), len(want_good), len(want_dead))

    got_dead: dict[str, list[DeadLetter]] = {}
    for msg in read_all(settings, settings.dead_letter_topic):
        letter = DeadLetter.from_headers(msg.headers())
        key = (msg.key() or b"").decode()
        got_dead.setdefault(key, []).append(letter)
        assert len(msg.value() or b"") <= 4096 or letter.reason != RejectReason.TOO_LARGE
        assert letter.error.startswith(letter.reason), letter
    assert {k: [d.reason for d in v] for k, v in got_dead.items()} == {
        k: [r.value] for k, r in want_dead.items()
    }, "each bad record dead-lettered once, with its reason"
    forwarded = [
        m.value() or b"" for m in read_all(settings, orders.topic) if not is_heartbeat(m.headers())
    ]
    assert sorted(forwarded) == sorted(want_good)
    by_reason = Counter(r.value for r in want_dead.values())
    print(
        f"fuzz: {len(sent)} sent, {len(delivered)} accepted, {len(want_good)} forwarded, "
        f"{len(want_dead)} dead-lettered {dict(by_reason)}"
    )
