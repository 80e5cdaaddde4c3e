"""The schema validator: every bad event gets a stable reason naming the field."""

from __future__ import annotations

from datetime import timedelta

import orjson
import pytest

from examples.delivery.sources import ORDERS
from features import EventSource, EventValidator, FeatureDefinitionError, Field, FieldType
from features.validation import Rejection, RejectReason, ValidEvent

NOW_MS = 1_795_428_000_000  # 2026-11-23T10:00:00Z
GOOD = {
    "order_id": "o-1",
    "restaurant_id": "r-7",
    "zone_id": "z-2",
    "items": 3,
    "subtotal": 25,
    "distance_km": 2.5,
    "placed_at": "2026-11-23T09:59:00.250+00:00",
}


def validate(doc: object) -> ValidEvent | Rejection:
    raw = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return EventValidator(ORDERS).validate(raw, now_ms=NOW_MS)


def test_valid_event_is_canonical():
    out = validate(GOOD)
    assert isinstance(out, ValidEvent)
    assert out.key == "r-7"
    assert out.event_time_ms == NOW_MS - 60_000 + 250
    values = orjson.loads(out.to_json())
    assert values["placed_at"] == out.event_time_ms
    assert values["subtotal"] == 25.0
    assert isinstance(values["subtotal"], float)


def test_epoch_millis_and_extra_fields_accepted():
    out = validate(GOOD | {"placed_at": NOW_MS - 5, "coupon": "X"})
    assert isinstance(out, ValidEvent)
    assert out.event_time_ms == NOW_MS - 5
    assert "coupon" not in out.values


@pytest.mark.parametrize(
    ("doc", "reason", "field"),
    [
        (b'{"order_id": "o-1", "restaurant_id"', RejectReason.INVALID_JSON, None),
        (b"[1, 2]", RejectReason.NOT_AN_OBJECT, None),
        ({k: v for k, v in GOOD.items() if k != "zone_id"}, RejectReason.MISSING_FIELD, "zone_id"),
        (GOOD | {"items": None}, RejectReason.NULL_FIELD, "items"),
        (GOOD | {"items": "3"}, RejectReason.WRONG_TYPE, "items"),
        (GOOD | {"items": True}, RejectReason.WRONG_TYPE, "items"),
        (GOOD | {"items": 2.5}, RejectReason.WRONG_TYPE, "items"),
        (GOOD | {"subtotal": "12.0"}, RejectReason.WRONG_TYPE, "subtotal"),
        (GOOD | {"restaurant_id": 7}, RejectReason.WRONG_TYPE, "restaurant_id"),
        (GOOD | {"restaurant_id": ""}, RejectReason.OUT_OF_RANGE, "restaurant_id"),
        (GOOD | {"items": 0}, RejectReason.OUT_OF_RANGE, "items"),
        (GOOD | {"subtotal": -1.0}, RejectReason.OUT_OF_RANGE, "subtotal"),
        (GOOD | {"placed_at": "yesterday"}, RejectReason.WRONG_TYPE, "placed_at"),
        (GOOD | {"placed_at": "2026-11-23T09:00:00"}, RejectReason.WRONG_TYPE, "placed_at"),
        (GOOD | {"placed_at": 1.5e12}, RejectReason.WRONG_TYPE, "placed_at"),
        (GOOD | {"placed_at": "1970-01-01T00:00:00Z"}, RejectReason.OUT_OF_RANGE, "placed_at"),
        (GOOD | {"placed_at": "2100-01-01T00:00:00Z"}, RejectReason.OUT_OF_RANGE, "placed_at"),
        (GOOD | {"placed_at": NOW_MS + 6 * 60_000}, RejectReason.OUT_OF_RANGE, "placed_at"),
    ],
)
def test_rejections_name_reason_and_field(doc, reason, field):
    out = validate(doc)
    assert isinstance(out, Rejection), out
    assert out.reason is reason
    assert out.field == field
    if field:
        assert repr(field) in out.describe()


def test_nan_is_not_json():
    out = validate(b'{"subtotal": NaN}')
    assert isinstance(out, Rejection)
    assert out.reason is RejectReason.INVALID_JSON


def test_nullable_field_accepts_null():
    source = EventSource(
        name="s",
        key_field="k",
        event_time_field="t",
        fields=(
            Field(name="k", type=FieldType.STRING),
            Field(name="t", type=FieldType.TIMESTAMP),
            Field(name="note", type=FieldType.STRING, nullable=True),
            Field(name="flag", type=FieldType.BOOL),
        ),
    )
    ok = EventValidator(source).validate(
        b'{"k":"a","t":1700000000000,"note":null,"flag":false}', NOW_MS
    )
    assert isinstance(ok, ValidEvent)
    assert ok.values == {"k": "a", "t": 1_700_000_000_000, "note": None, "flag": False}
    bad = EventValidator(source).validate(
        b'{"k":"a","t":1700000000000,"note":null,"flag":0}', NOW_MS
    )
    assert isinstance(bad, Rejection)
    assert (bad.reason, bad.field) == (RejectReason.WRONG_TYPE, "flag")


def _source(**overrides: object) -> EventSource:
    spec: dict[str, object] = {
        "name": "clicks",
        "key_field": "user",
        "event_time_field": "at",
        "fields": (
            Field(name="user", type=FieldType.STRING),
            Field(name="at", type=FieldType.TIMESTAMP),
            Field(name="n", type=FieldType.INT, minimum=0, maximum=9),
        ),
    }
    return EventSource.model_validate(spec | overrides)


def test_source_defaults_topics():
    source = _source()
    assert (source.topic, source.raw_topic) == ("events.clicks", "raw.clicks")


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"name": "Clicks"}, "name", "lower_snake_case"),
        ({"key_field": "nobody"}, "key_field", "not a declared field"),
        ({"key_field": "n"}, "key_field", "non-nullable string"),
        ({"event_time_field": "user"}, "event_time_field", "timestamp"),
        ({"topic": "bad topic!"}, "topic", "not a valid Kafka topic"),
        ({"allowed_lateness": timedelta(seconds=-1)}, "allowed_lateness", "negative"),
        (
            {"fields": (Field(name="user", type=FieldType.STRING),) * 2},
            "fields.user",
            "declared twice",
        ),
        (
            {
                "fields": (
                    Field(name="user", type=FieldType.STRING, minimum=1),
                    Field(name="at", type=FieldType.TIMESTAMP),
                )
            },
            "fields.user",
            "int and float only",
        ),
    ],
)
def test_bad_source_definitions_name_the_field(overrides, field, words):
    with pytest.raises(FeatureDefinitionError) as info:
        _source(**overrides)
    assert info.value.field == field
    assert words in str(info.value)
    assert "EventSource" in str(info.value)
