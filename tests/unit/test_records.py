"""core.records: every topic record round-trips, carries its version, and a bad one gives a
RecordError that names the field and the reason."""

from __future__ import annotations

import pickle
from typing import Any, cast

import numpy as np
import orjson
import pytest

from core.errors import ExitCode, RecordError
from core.records import (
    H_FIELD,
    H_OFFSET,
    H_PARTITION,
    H_REASON,
    H_SOURCE,
    H_VERSION,
    H_VIEW,
    DeadLetter,
    FeatureRow,
    FeedbackRecord,
    PredictionRecord,
)
from core.stream_stats import PrepareCounts, PublishCounts, StreamStats, WindowCounts
from events.ingest import IngestRouter
from examples.delivery.sources import COURIER_PINGS, SOURCES

ROW = FeatureRow(
    view="restaurant_orders",
    entity_key="r00012",
    window_end_ms=1_767_268_800_000,
    values={"count_5m": 3, "sum_subtotal_1h": 81.5, "mean_subtotal_1h": None, "last_zone": "z1"},
    emitted_at_ms=1_767_268_801_234,
)
PREDICTION = PredictionRecord(
    prediction_id="5f0c",
    time_ms=1_767_268_801_000,
    model="delivery_eta",
    model_version=3,
    prediction=1534.25,
    latency_ms=2.125,
    request={"restaurant_id": "r00012", "zone_id": "z03", "distance_km": 2.4, "items": 3},
    features={"restaurant_orders:count_5m": 3, "order_request:distance_km": 2.4, "x:y": None},
    feature_ages_ms={"restaurant_orders": 61_000, "zone_couriers": None},
    missing=["zone_couriers"],
    stale=[],
)
FEEDBACK = FeedbackRecord("5f0c", 1490.0, 1_767_268_900_000, "delivery_eta", 3, 1534.25)
UNMATCHED = FeedbackRecord("elsewhere", 12.0, 1_767_268_900_000)
LATE = DeadLetter(
    reason="late",
    field=None,
    error="late: event time is behind the watermark",
    source="orders",
    source_topic="events.orders",
    partition=2,
    offset=417,
    view="restaurant_orders",
)
STATS = [
    StreamStats("run1", "restaurant_orders", 0, counts, final, 1_767_268_801_000)
    for counts, final in (
        (PrepareCounts(events=10, late=1, first_at_ms=5, offsets={0: 7, 3: 12}), False),
        (WindowCounts(aggregated=9), False),
        (PublishCounts(rows=4, online_written=3, max_end_ms=60_000, watermark=59_000), True),
    )
]
JSON_RECORDS: list[Any] = [ROW, PREDICTION, FEEDBACK, UNMATCHED, *STATS]


@pytest.mark.parametrize("record", JSON_RECORDS, ids=lambda r: type(r).__name__)
def test_every_record_round_trips_and_carries_its_version(record: Any):
    data = record.encode()
    assert type(record).decode(data) == record
    assert orjson.loads(data)["v"] == type(record).VERSION == 1


def test_dead_letters_round_trip_through_headers_with_a_version():
    headers = LATE.to_headers()
    assert dict(headers)[H_VERSION] == b"1"
    assert dict(headers)[H_VIEW] == b"restaurant_orders"
    assert DeadLetter.from_headers(headers) == LATE
    # librdkafka hands headers back as a list of (str, bytes); a dict of text works too.
    as_text = {name: cast(bytes, value).decode() for name, value in headers}
    assert DeadLetter.from_headers(as_text) == LATE
    ingest_style = DeadLetter("wrong_type", "speed", "wrong_type: ...", "pings", "raw.pings", 0, 1)
    assert H_VIEW not in dict(ingest_style.to_headers())
    assert DeadLetter.from_headers(ingest_style.to_headers()) == ingest_style


def test_json_field_names_are_those_written_before_records_were_typed():
    """Readers of the topics keep their meaning: the names are unchanged, "v" is added."""
    assert set(orjson.loads(ROW.encode())) == {
        "v",
        *("view", "entity_key", "window_end_ms", "values", "emitted_at_ms"),
    }
    assert set(orjson.loads(PREDICTION.encode())) == {
        "v",
        *("prediction_id", "time_ms", "model", "model_version", "prediction", "latency_ms"),
        *("request", "features", "feature_ages_ms", "missing", "stale"),
    }
    assert set(orjson.loads(FEEDBACK.encode())) == {
        "v",
        *("prediction_id", "label", "time_ms", "model", "model_version", "prediction"),
    }
    # An unmatched feedback carries no model fields, as before.
    assert set(orjson.loads(UNMATCHED.encode())) == {"v", "prediction_id", "label", "time_ms"}
    assert not UNMATCHED.matched
    stats = orjson.loads(STATS[0].encode())
    assert stats["op"] == "prepare"
    assert stats["offsets"] == {"0": 7, "3": 12}
    assert {"run", "view", "op", "subtask", "events", "final", "at_ms"} <= set(stats)


def test_records_written_before_versions_read_as_version_1():
    old_row = orjson.dumps(
        {"view": "v", "entity_key": "k", "window_end_ms": 60_000, "values": {}, "emitted_at_ms": 1}
    )
    assert FeatureRow.decode(old_row).v == 1
    old_headers = [(name, value) for name, value in LATE.to_headers() if name != H_VERSION]
    assert DeadLetter.from_headers(old_headers).v == 1


def test_the_hot_path_encoder_writes_what_encode_writes():
    fields = (ROW.view, ROW.entity_key, ROW.window_end_ms, ROW.values, ROW.emitted_at_ms)
    assert FeatureRow.encode_row(*fields) == ROW.encode()


def test_numpy_values_in_a_prediction_are_encoded():
    record = PredictionRecord(
        "n", 1, "m", 1, cast(float, np.float64(2.5)), 0.5, {}, {"v:f": np.float32(1.5)}, {}, [], []
    )
    decoded = PredictionRecord.decode(record.encode())
    assert (decoded.prediction, decoded.features) == (2.5, {"v:f": 1.5})


def _with(record: Any, **changes: Any) -> bytes:
    return orjson.dumps(orjson.loads(record.encode()) | changes)


def _without(record: Any, name: str) -> bytes:
    return orjson.dumps({k: v for k, v in orjson.loads(record.encode()).items() if k != name})


@pytest.mark.parametrize(
    ("cls", "data", "field", "reason"),
    [
        (FeatureRow, _with(ROW, window_end_ms="soon"), "window_end_ms", "expected an integer"),
        (FeatureRow, _with(ROW, window_end_ms=True), "window_end_ms", "got boolean"),
        (FeatureRow, _without(ROW, "entity_key"), "entity_key", "missing"),
        (FeatureRow, _with(ROW, values=[1, 2]), "values", "expected an object"),
        (FeatureRow, _with(ROW, values={"a": {"b": 1}}), "values.a", "expected a scalar"),
        (FeatureRow, _with(ROW, v=2), "v", "version 2 is newer"),
        (FeatureRow, _with(ROW, v="1"), "v", "version number"),
        (PredictionRecord, _with(PREDICTION, prediction="fast"), "prediction", "a number"),
        (PredictionRecord, _with(PREDICTION, missing=["a", 1]), "missing", "array of strings"),
        (
            PredictionRecord,
            _with(PREDICTION, feature_ages_ms={"zone": 1.5}),
            "feature_ages_ms.zone",
            "integer or null",
        ),
        (FeedbackRecord, _with(FEEDBACK, label=None), "label", "got null"),
        (FeedbackRecord, _with(FEEDBACK, model_version="3"), "model_version", "an integer"),
        (StreamStats, _with(STATS[0], op="sink"), "op", "'sink' is not one of"),
        (StreamStats, _without(STATS[0], "events"), "events", "missing"),
        (StreamStats, _with(STATS[0], offsets={"p0": 1}), "offsets.p0", "integer key"),
        (StreamStats, _with(STATS[2], final="yes"), "final", "true or false"),
    ],
)
def test_a_bad_record_names_the_field_and_the_reason(
    cls: Any, data: bytes, field: str, reason: str
):
    with pytest.raises(RecordError, match=reason) as caught:
        cls.decode(data)
    assert caught.value.field == field
    assert f"field {field!r}" in str(caught.value)
    assert str(caught.value).startswith(f"{cls.KIND} record: ")
    assert caught.value.exit_code is ExitCode.DATA


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"{not json", "not JSON"), (b"[1, 2]", "expected a JSON object, got array"), (None, "value")],
)
def test_a_record_that_is_not_an_object_says_so(data: bytes | None, reason: str):
    with pytest.raises(RecordError, match=reason) as caught:
        FeatureRow.decode(data)
    assert caught.value.field is None


def test_bad_dead_letter_headers_name_the_header():
    headers = dict(LATE.to_headers())
    with pytest.raises(RecordError, match="expected an integer") as caught:
        DeadLetter.from_headers(headers | {H_PARTITION: b"two"})
    assert caught.value.field == H_PARTITION
    with pytest.raises(RecordError, match="missing header") as caught:
        DeadLetter.from_headers({k: v for k, v in headers.items() if k != H_OFFSET})
    assert caught.value.field == H_OFFSET
    with pytest.raises(RecordError, match="newer") as caught:
        DeadLetter.from_headers(headers | {H_VERSION: b"9"})
    assert caught.value.field == H_VERSION
    with pytest.raises(RecordError, match="UTF-8"):
        DeadLetter.from_headers(headers | {H_SOURCE: b"\xff"})


def test_record_errors_survive_pickling():
    error = RecordError("feature row", "values", "expected an object, got array")
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.field, copy.reason) == (str(error), "values", error.reason)


def test_ingest_writes_dead_letters_that_decode():
    router = IngestRouter(SOURCES, "dlq")
    raw = orjson.dumps({"courier_id": "c-1", "speed_kmh": "fast"})
    out = router.route(COURIER_PINGS.raw_topic, raw, b"c-1", 3, 42)
    letter = DeadLetter.from_headers(out.headers)
    assert (letter.source, letter.source_topic) == ("courier_pings", COURIER_PINGS.raw_topic)
    assert (letter.partition, letter.offset, letter.view) == (3, 42, None)
    assert letter.reason in {"missing_field", "wrong_type"}
    assert letter.field is not None
    assert letter.field in letter.error
    headers = dict(out.headers or [])
    assert headers[H_REASON] == letter.reason.encode()
    assert headers[H_FIELD] == letter.field.encode()


class _Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, str]] = []

    def produce(self, topic: str, value: bytes, key: str, timestamp_ms: int) -> None:
        self.sent.append((topic, value, key))


def test_stats_reporter_sends_stream_stats_only_when_counts_change():
    from core.settings import Settings
    from streaming.sinks import STATS_TOPIC, JobContext, StatsReporter

    producer = _Producer()
    reporter = StatsReporter(cast(Any, producer), JobContext(Settings(), "run7"), "view_a", 1)
    prepare, windows = PrepareCounts(), WindowCounts()
    reporter.report(prepare)
    reporter.report(windows)
    reporter.report(prepare)  # unchanged: not sent again
    prepare.events += 1
    prepare.offsets[0] = 1  # changed in place: still seen as a change
    reporter.report(prepare)
    reporter.report(prepare, final=True)
    records = [StreamStats.decode(value) for _, value, _ in producer.sent]
    assert [(r.op, r.final) for r in records] == [
        ("prepare", False),
        ("windows", False),
        ("prepare", False),
        ("prepare", True),
    ]
    assert records[2].counts == PrepareCounts(events=1, offsets={0: 1})
    assert {topic for topic, _, _ in producer.sent} == {STATS_TOPIC}
    assert producer.sent[1][2] == "run7/view_a/windows/1"
