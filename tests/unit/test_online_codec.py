"""feature_repo/codec.py against Feast 0.67's own encoders, byte for byte (no server needed)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from feature_repo import codec
from features.schema import FieldType

KEYS = ["r1", "", "zone-éé", "x" * 300]


@pytest.fixture(scope="module")
def feast() -> SimpleNamespace:
    from feast.infra.online_stores.helpers import _mmh3, _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Null, Value
    from feast.type_map import feast_value_type_to_python_type
    from google.protobuf.timestamp_pb2 import Timestamp

    return SimpleNamespace(
        Timestamp=Timestamp,
        mmh3=_mmh3,
        redis_key=_redis_key,
        EntityKey=EntityKey,
        Value=Value,
        Null=Null,
        to_python=feast_value_type_to_python_type,
    )


@pytest.mark.parametrize("key", KEYS)
def test_entity_hash_key_matches_feast(feast, key):
    proto = feast.EntityKey(
        join_keys=["restaurant_id"], entity_values=[feast.Value(string_val=key)]
    )
    expected = feast.redis_key("sluice", proto, entity_key_serialization_version=3)
    prefix = codec.entity_key_prefix("restaurant_id")
    assert codec.entity_hash_key(prefix, key, "sluice") == expected


@pytest.mark.parametrize("name", ["count_5m", "mean_subtotal_1h", "é_1d"])
def test_feature_field_matches_feast(feast, name):
    assert codec.feature_field("restaurant_orders", name) == feast.mmh3(f"restaurant_orders:{name}")
    assert codec.timestamp_field("restaurant_orders") == b"_ts:restaurant_orders"


INTS = [0, 1, 127, 128, 300, -1, -300, 2**63 - 1, -(2**63)]
FLOATS = [0.0, -0.0, 1.5, -2.25, 1e300, 5e-324, math.inf, -math.inf]
STRINGS = ["", "a", "é" * 200]


@pytest.mark.parametrize(
    ("value", "dtype", "member"),
    [(v, FieldType.INT, "int64_val") for v in INTS]
    + [(v, FieldType.FLOAT, "double_val") for v in FLOATS]
    + [(v, FieldType.STRING, "string_val") for v in STRINGS]
    + [(v, FieldType.BOOL, "bool_val") for v in (True, False)],
)
def test_values_encode_like_feast_and_decode_back(feast, value, dtype, member):
    expected = feast.Value(**{member: value}).SerializeToString()
    assert codec.encode_value(value, dtype) == expected
    decoded = codec.decode_value(expected)
    assert decoded == value
    assert type(decoded) is type(value)
    assert decoded == feast.to_python(feast.Value.FromString(expected))


def test_ints_stored_as_float_features_become_doubles(feast):
    assert codec.encode_value(3, FieldType.FLOAT) == feast.Value(double_val=3.0).SerializeToString()


@pytest.mark.parametrize("dtype", list(FieldType)[:4])
def test_null_and_nan_are_the_empty_value(feast, dtype):
    assert codec.encode_value(None, dtype) == b"" == feast.Value().SerializeToString()
    assert codec.decode_value(b"") is None
    assert codec.decode_value(None) is None
    assert codec.encode_value(math.nan, FieldType.FLOAT) == b""
    assert codec.encode_value(math.nan, FieldType.INT) == b""  # pandas' int column with nulls


def test_null_val_reads_as_null_here_but_zero_through_feast(feast):
    # Why codec never writes null_val: Feast itself would serve it as 0.
    data = feast.Value(null_val=feast.Null.NULL).SerializeToString()
    assert codec.decode_value(data) is None
    assert feast.to_python(feast.Value.FromString(data)) == 0


@pytest.mark.parametrize(
    "value",
    [
        {"int32_val": -7},
        {"float_val": 1.5},
        {"unix_timestamp_val": 1_700_000_000},
        {"bytes_val": b"\x00\x01"},
    ],
)
def test_other_scalar_members_decode(feast, value):
    data = feast.Value(**value).SerializeToString()
    assert codec.decode_value(data) == next(iter(value.values()))


def test_list_members_are_refused(feast):
    data = feast.Value(int64_list_val={"val": [1, 2]}).SerializeToString()
    with pytest.raises(ValueError, match="unsupported Value member"):
        codec.decode_value(data)


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        ("3", FieldType.INT),
        (True, FieldType.INT),
        (1.5, FieldType.INT),
        ("x", FieldType.FLOAT),
        (True, FieldType.FLOAT),
        (3, FieldType.STRING),
        (1, FieldType.BOOL),
    ],
)
def test_wrong_types_are_refused(value, dtype):
    with pytest.raises(TypeError, match="expected"):
        codec.encode_value(value, dtype)


@pytest.mark.parametrize("ms", [0, 1, 999, 1000, 1_795_000_000_000, 1_795_000_000_123])
def test_timestamps_encode_like_feast(feast, ms):
    ts = feast.Timestamp()
    ts.FromDatetime(datetime.fromtimestamp(ms / 1000, tz=UTC))
    assert codec.encode_timestamp_ms(ms) == ts.SerializeToString()
    assert codec.decode_timestamp_ms(ts.SerializeToString()) == ms


def test_read_commands_are_packed_as_redis_py_packs_them():
    """RedisOnlineStore.read_many packs its HMGETs itself (from pre-encoded fields): the bytes
    must be exactly what redis-py would send, for every view and odd keys alike."""
    from redis.connection import Connection

    from examples.delivery.features import restaurant_orders, restaurant_prep, zone_couriers
    from feature_repo.online import RedisOnlineStore
    from feature_repo.redis_wire import resp_bulk as _resp_bulk

    store = RedisOnlineStore("redis://127.0.0.1:1/0", "proj")  # never connects
    untyped: Any = Connection  # redis-py's packer, as the pipeline uses it
    connection = untyped()
    for view in (restaurant_orders, zone_couriers, restaurant_prep):
        layout = store._layout(view)
        fields = [*layout.fields, layout.ts_field, layout.end_field]
        fields += [b"_sluice_prev:" + f for f in layout.fields] + [layout.previous_end_field]
        for key in KEYS:
            hash_key = codec.entity_hash_key(layout.key_prefix, key, "proj")
            ours = layout.hmget_head + _resp_bulk(hash_key) + layout.hmget_fields
            assert ours == b"".join(connection.pack_command("HMGET", hash_key, *fields))


def test_the_previous_slot_never_shares_a_field_with_feast():
    from feature_repo.online import _WRITE_IF_NOT_OLDER, PREVIOUS_PREFIX, previous_field

    field = codec.feature_field("restaurant_orders", "count_5m")
    assert previous_field(field) == PREVIOUS_PREFIX + field
    assert len(previous_field(field)) != 4  # Feast's feature fields are 4 bytes (murmur3)
    assert not PREVIOUS_PREFIX.startswith(b"_ts:")  # Feast's delete_table keys on "_ts:"
    assert "{PREVIOUS_PREFIX}" not in _WRITE_IF_NOT_OLDER
    assert f"'{PREVIOUS_PREFIX.decode()}' .. name" in _WRITE_IF_NOT_OLDER
