"""Fuzzed raw events: validation never raises, every bad event gets a stable reason (naming the
field when one is at fault), and ingest's router dead-letters it with that reason in its
headers, counting received == valid + dead-lettered."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.records import DeadLetter
from events.ingest import TOO_LARGE_PREFIX_BYTES, IngestRouter
from examples.delivery.sources import ORDERS
from features import EventValidator
from features.validation import INT64_MAX, INT64_MIN, Rejection, RejectReason, ValidEvent

NOW_MS = 1_795_428_000_000  # 2026-11-23T10:00:00Z
GOOD: dict[str, Any] = {
    "order_id": "o-1",
    "restaurant_id": "r-7",
    "zone_id": "z-2",
    "items": 3,
    "subtotal": 25,
    "distance_km": 2.5,
    "placed_at": "2026-11-23T09:59:00.250+00:00",
}
FIELDS = [f.name for f in ORDERS.fields]
VALIDATOR = EventValidator(ORDERS)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=INT64_MIN, max_value=2**64 - 1)  # what orjson writes
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


def check_outcome(out: ValidEvent | Rejection, raw: bytes) -> None:
    """What holds for every outcome, whatever the input."""
    if isinstance(out, Rejection):
        assert isinstance(out.reason, RejectReason)
        assert out.field is None or out.field in FIELDS
        assert out.describe().startswith(out.reason.value)
        return
    # A valid event: canonical, in range for both engines, and canonical again when re-read.
    assert set(out.values) == set(FIELDS)
    assert all(INT64_MIN <= v <= INT64_MAX for v in out.values.values() if isinstance(v, int)), (
        out.values
    )
    again = VALIDATOR.validate(out.to_json(), now_ms=NOW_MS)
    assert again == out, (raw, again)


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise(raw: bytes) -> None:
    out = VALIDATOR.validate(raw, now_ms=NOW_MS)
    check_outcome(out, raw)
    assert isinstance(out, Rejection)  # random bytes are never a whole valid order


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS), json_values, min_size=1), st.booleans())
def test_wrong_types_name_the_field(changes: dict[str, Any], drop: bool) -> None:
    doc = GOOD | changes
    if drop:
        del doc[next(iter(changes))]
    raw = orjson.dumps(doc)
    out = VALIDATOR.validate(raw, now_ms=NOW_MS)
    check_outcome(out, raw)
    if isinstance(out, Rejection):
        # Only a changed (or dropped) field can be at fault: the rest is a good order.
        assert out.field in changes, (changes, out)


@FUZZ
@given(st.data())
def test_truncated_json_is_invalid_json(data: st.DataObject) -> None:
    raw = orjson.dumps(GOOD | {"order_id": data.draw(st.text(max_size=30))})
    cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    out = VALIDATOR.validate(raw[:cut], now_ms=NOW_MS)
    assert isinstance(out, Rejection)
    assert out.reason is RejectReason.INVALID_JSON


@FUZZ
@given(st.integers(min_value=1, max_value=3000), st.sampled_from(["[", '{"x":']))
def test_deep_nesting(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "1" + closer * depth
    raw = orjson.dumps(GOOD)[:-1] + b',"extra":' + nested.encode() + b"}"
    out = VALIDATOR.validate(raw, now_ms=NOW_MS)
    check_outcome(out, raw)
    if depth + 1 > 1024:  # orjson's depth limit, the event object included
        assert isinstance(out, Rejection)
        assert out.reason is RejectReason.INVALID_JSON
    else:
        assert isinstance(out, ValidEvent)  # an unknown field is dropped, however deep


@FUZZ
@given(st.integers(min_value=INT64_MAX + 1, max_value=2**64 - 1) | st.just(-(2**63) - 1))
def test_integers_beyond_int64_are_out_of_range(n: int) -> None:
    raw = orjson.dumps(GOOD)[:-1] + b',"items":' + str(n).encode() + b"}"
    out = VALIDATOR.validate(raw, now_ms=NOW_MS)
    assert isinstance(out, Rejection)
    # Beyond u64, orjson reads a float (wrong type for an int field); else out of range.
    assert (out.reason, out.field) in {
        (RejectReason.OUT_OF_RANGE, "items"),
        (RejectReason.WRONG_TYPE, "items"),
    }


def test_huge_numbers_and_payloads() -> None:
    for raw, reason in [
        (b'{"items": 1e999}', RejectReason.INVALID_JSON),  # beyond a double
        (orjson.dumps(GOOD | {"order_id": "x" * 200_000}), RejectReason.TOO_LARGE),
        (b"\x00" * (1 << 20), RejectReason.TOO_LARGE),  # 1 MiB, not even read
    ]:
        out = VALIDATOR.validate(raw, now_ms=NOW_MS)
        assert isinstance(out, Rejection)
        assert out.reason is reason, out
    big_but_allowed = orjson.dumps(GOOD | {"zone_id": "z" * 100_000})
    assert isinstance(VALIDATOR.validate(big_but_allowed, now_ms=NOW_MS), ValidEvent)
    small = EventValidator(ORDERS, max_bytes=1024)
    out = small.validate(big_but_allowed, now_ms=NOW_MS)
    assert isinstance(out, Rejection)
    assert out.reason is RejectReason.TOO_LARGE
    assert f"{len(big_but_allowed)} bytes" in out.message


fuzzed_records = st.one_of(
    st.binary(max_size=300),
    st.builds(orjson.dumps, st.dictionaries(st.sampled_from(FIELDS), json_values)),
    st.builds(
        lambda changes: orjson.dumps(GOOD | changes),
        st.dictionaries(st.sampled_from(FIELDS), json_scalars),
    ),
    st.just(orjson.dumps(GOOD)),
    st.just(b"\x7b" * 300_000),  # too large
    st.none(),  # a tombstone
)


@FUZZ
@given(st.lists(fuzzed_records, max_size=40))
def test_router_dead_letters_every_bad_record_with_its_reason(
    records: list[bytes | None],
) -> None:
    router = IngestRouter([ORDERS], "dead")
    dead = 0
    for offset, value in enumerate(records):
        out = router.route(ORDERS.raw_topic, value, b"k", 0, offset, now_ms=NOW_MS)
        if out.topic == ORDERS.topic:
            assert value is not None
            assert isinstance(VALIDATOR.validate(value, now_ms=NOW_MS), ValidEvent)
            continue
        dead += 1
        letter = DeadLetter.from_headers(out.headers)
        assert letter.reason in {r.value for r in RejectReason}
        assert letter.offset == offset
        assert letter.source == ORDERS.name
        assert len(out.value) <= max(len(value or b""), 0)
        if letter.reason == RejectReason.TOO_LARGE:
            assert out.value == (value or b"")[:TOO_LARGE_PREFIX_BYTES]
        else:
            assert out.value == (value or b"")
    counts = router.counts
    assert counts.received == len(records)
    assert counts.dead_lettered == dead
    assert counts.balanced()
    assert sum(counts.by_reason.values()) == dead
