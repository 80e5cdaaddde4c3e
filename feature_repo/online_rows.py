"""The online store's rows as Redis holds them: a view's layout (where each value lives) and the
decoding of HMGET replies into OnlineRows, the hot path of every prediction batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from feature_repo import codec
from feature_repo.errors import OnlineStoreError
from feature_repo.online_store import OnlineRow
from features.definitions import FeatureView
from features.schema import FieldType


@dataclass(frozen=True)
class Layout:
    """Where a view's values live, computed once per view (murmur3 hashes, key prefix)."""

    view: FeatureView
    names: tuple[str, ...]
    dtypes: tuple[FieldType, ...]
    fields: tuple[bytes, ...]
    ts_field: bytes
    end_field: bytes
    previous_end_field: bytes
    key_prefix: bytes
    empty_list: list[Any]  # each feature's empty value, in names order
    lateness_ms: int
    # read_many's HMGET per entity in RESP, but for the key: newest row, then previous
    hmget_head: bytes
    hmget_fields: bytes
    # entity key -> its hash key as a RESP bulk string (cleared when it holds KEY_CACHE keys)
    bulk_keys: dict[str, bytes]


def row_of(
    key: str, end_ms: int, values: dict[str, Any], previous: OnlineRow | None, empty: bool
) -> OnlineRow:
    """OnlineRow(key, end_ms, values, previous, empty), built without the frozen dataclass's
    __init__ (one object.__setattr__ call per field: a quarter of read_many's decoding time
    for 300 rows). Equal to the row __init__ builds; tested in tests/unit/test_online_read.py."""
    row: OnlineRow = object.__new__(OnlineRow)
    fields = row.__dict__
    fields["entity_key"] = key
    fields["window_end_ms"] = end_ms
    fields["values"] = values
    fields["previous"] = previous
    fields["empty"] = empty
    return row


def decode_rows(
    layout: Layout,
    entity_keys: Sequence[str],
    replies: Sequence[Sequence[bytes | None]],
    target: int | None = None,
) -> list[OnlineRow | None]:
    """Rows from HMGET replies. The previous row is decoded only when a caller may need it:
    ``target`` None, or the newest row's end after ``target`` (the window end due at the
    earliest t the caller serves: the newest is not servable then, features/contract.py)."""
    # The hot path of every prediction batch: C-level map/zip, and emptiness as one list
    # comparison with the empty values (0 == 0.0 for sums; None only equals None).
    n = len(layout.fields)
    names, empties, decode = layout.names, layout.empty_list, codec.decode_value
    out: list[OnlineRow | None] = []
    for key, reply in zip(entity_keys, replies, strict=True):
        ts, end, previous_end = reply[n], reply[n + 1], reply[-1]
        if ts is None:
            out.append(None)
            continue
        try:
            # Rows written by Feast itself have no end field; their _ts is the Feast
            # source's timestamp, the servable time: window end + lateness
            # (feature_repo/definitions.py).
            end_ms = (
                int(end) if end is not None else codec.decode_timestamp_ms(ts) - layout.lateness_ms
            )
            newest = list(map(decode, reply[:n]))
            previous = None
            if previous_end is not None and end is not None and (target is None or end_ms > target):
                kept = list(map(decode, reply[n + 2 : 2 * n + 2]))
                values = dict(zip(names, kept, strict=True))
                previous = row_of(key, int(previous_end), values, None, kept == empties)
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise OnlineStoreError(
                f"view {layout.view.name!r}, entity {key!r}: undecodable value: {exc}"
            ) from None
        values = dict(zip(names, newest, strict=True))
        out.append(row_of(key, end_ms, values, previous, newest == empties))
    return out
