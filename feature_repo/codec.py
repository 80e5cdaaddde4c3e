"""Feast 0.67's Redis online-store encoding, written out so that readers need not import Feast.

`import feast` costs 5-8 s and importing its protobuf classes imports all of it, so the predictor
and the streaming writer use these few functions instead. tests/unit/test_online_codec.py checks
them byte for byte against Feast's own code (feast/infra/online_stores/redis.py, helpers.py and
key_encoding_utils.py, entity key serialization version 3):

- hash key of an entity: serialize_entity_key(EntityKey([join_key], [Value(string_val=key)]))
  + project, i.e. <u32 1 key> <u32 STRING> <u32 len> join_key <u32 STRING> <u32 len> key project
- hash field of a feature: murmur3_32("<view>:<feature>"), unsigned, 4 bytes little-endian
- field "_ts:<view>": a google.protobuf.Timestamp, the row's event time
- feature values: feast.types.Value messages. Null is the empty message b"": Feast reads
  Value(null_val=NULL) back as 0, not None, so null_val must never be written.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import mmh3

from features.schema import FieldType

_STRING_TYPE = 2  # feast.types.ValueType.STRING
_U64 = (1 << 64) - 1
_DOUBLE = struct.Struct("<d")
_FLOAT = struct.Struct("<f")

# Tags (field number << 3 | wire type) of the feast.types.Value members we write.
_TAG_STRING = b"\x12"  # string_val = 2, length-delimited
_TAG_INT64 = b"\x20"  # int64_val = 4, varint
_TAG_DOUBLE = b"\x29"  # double_val = 5, 64-bit
_TAG_BOOL = b"\x38"  # bool_val = 7, varint


def entity_key_prefix(join_key: str) -> bytes:
    """Everything of an entity's hash key that precedes the key value (one per view)."""
    name = join_key.encode()
    return struct.pack("<III", 1, _STRING_TYPE, len(name)) + name


def entity_hash_key(prefix: bytes, key: str, project: str) -> bytes:
    value = key.encode()
    return prefix + struct.pack("<II", _STRING_TYPE, len(value)) + value + project.encode()


def feature_field(view: str, feature: str) -> bytes:
    return struct.pack("<I", mmh3.hash(f"{view}:{feature}", signed=False))


def timestamp_field(view: str) -> bytes:
    return f"_ts:{view}".encode()


def _varint(value: int) -> bytes:
    value &= _U64  # negative int64 values take ten bytes, as two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


def encode_value(value: Any, dtype: FieldType) -> bytes:
    """A Python value of a feature of type dtype as a serialized Value; None (and NaN) -> null.

    NaN counts as null because pandas and Arrow-to-pandas conversions spell null floats as NaN;
    no aggregation of ours produces a real NaN. Raises TypeError for a value of the wrong type.
    """
    if value is None:
        return b""
    if dtype is FieldType.FLOAT:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a float, got {type(value).__name__}")
        number = float(value)
        return b"" if math.isnan(number) else _TAG_DOUBLE + _DOUBLE.pack(number)
    if dtype is FieldType.INT:
        if isinstance(value, float) and math.isnan(value):
            return b""
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an int, got {type(value).__name__}")
        return _TAG_INT64 + _varint(value)
    if dtype is FieldType.STRING:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__}")
        data = value.encode()
        return _TAG_STRING + _varint(len(data)) + data
    if dtype is FieldType.BOOL:
        if not isinstance(value, bool):
            raise TypeError(f"expected a bool, got {type(value).__name__}")
        return _TAG_BOOL + (b"\x01" if value else b"\x00")
    raise TypeError(f"features of type {dtype} cannot be stored online")


def decode_value(data: bytes | None) -> Any:
    """A serialized Value as a Python value: None for missing, empty and null_val values.

    Reads every scalar member (bytes, string, int32, int64, double, float, bool, unix
    timestamp); list and map members raise ValueError, as no Sluice feature has them.
    """
    if not data:
        return None
    # Fast paths for the common shapes: a double, and a small non-negative int64.
    if data[0] == 0x29 and len(data) == 9:
        return _DOUBLE.unpack_from(data, 1)[0]
    if data[0] == 0x20 and len(data) == 2:
        return data[1]
    result: Any = None
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            raw, pos = _read_varint(data, pos)
            if number in (3, 4, 8):  # int32, int64, unix timestamp
                result = _signed64(raw)
            elif number == 7:
                result = bool(raw)
            elif number == 19:  # null_val
                result = None
            else:
                raise ValueError(f"unsupported Value member {number}")
        elif wire == 1 and number == 5:
            result = _DOUBLE.unpack_from(data, pos)[0]
            pos += 8
        elif wire == 5 and number == 6:
            result = _FLOAT.unpack_from(data, pos)[0]
            pos += 4
        elif wire == 2 and number in (1, 2):
            length, pos = _read_varint(data, pos)
            chunk = data[pos : pos + length]
            pos += length
            result = chunk.decode() if number == 2 else chunk
        else:
            raise ValueError(f"unsupported Value member {number} (wire type {wire})")
    return result


def encode_timestamp_ms(epoch_ms: int) -> bytes:
    """A google.protobuf.Timestamp (seconds = 1, nanos = 2; zero fields are omitted)."""
    seconds, millis = divmod(epoch_ms, 1000)
    out = b""
    if seconds:
        out += b"\x08" + _varint(seconds)
    if millis:
        out += b"\x10" + _varint(millis * 1_000_000)
    return out


def decode_timestamp_ms(data: bytes) -> int:
    seconds = nanos = 0
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        raw, pos = _read_varint(data, pos)
        if key == 0x08:
            seconds = _signed64(raw)
        elif key == 0x10:
            nanos = raw
    return seconds * 1000 + nanos // 1_000_000
