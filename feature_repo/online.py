"""RedisOnlineStore: the OnlineStore (online_store.py) that keeps rows in Feast's Redis layout.

Spark backfills, the Flink job and the predictor reach it through open_online_store(settings)
for redis:// and rediss:// URLs, so the layout lives in one place (see codec.py). What it adds
to Feast's layout is one integer field per entity and view, "_sluice_end_ms:<view>", the
window end of the stored row. A Lua script compares it and writes the row in one atomic step,
so concurrent writers (a backfill and the stream) can never put an older window over a newer
one; Feast's own write path compares timestamps in Python between two round trips and can.
Rows written by other tools (Feast's write_to_online_store) are read correctly; a write over
them is not ordered against them, since they carry no end.

Feast does not apply a view's ttl to online reads (nor does read() here): callers compare
OnlineRow.window_end_ms with the current window end to judge freshness.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Self

import redis

from core.settings import Settings
from feature_repo import codec
from feature_repo.errors import OnlineStoreError
from feature_repo.online_store import OnlineRow, OnlineStore, WriteReport
from features.definitions import FeatureView
from features.schema import FieldType

# OnlineRow and WriteReport are importable from here, as before the interface existed.
__all__ = ["DEFAULT_BATCH_ROWS", "OnlineRow", "RedisOnlineStore", "WriteReport", "end_field"]

# KEYS[1]: the entity's hash. ARGV[1]: the end field, ARGV[2]: Feast's _ts field, ARGV[3]: the
# row's window end (ms), ARGV[4..]: field/value pairs (_ts and every feature).
# Returns 0 when a newer row is stored (nothing written), 1 when written, 2 when the same window
# end was rewritten. The stored end counts only next to its _ts field: when Feast deletes a view's
# fields (apply after removing the view) the stale end must not block the view's next life.
_WRITE_IF_NOT_OLDER = """
local stored = redis.call('HMGET', KEYS[1], ARGV[1], ARGV[2])
local result = 1
if stored[1] and stored[2] then
  local old, new = tonumber(stored[1]), tonumber(ARGV[3])
  if old > new then return 0 end
  if old == new then result = 2 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], unpack(ARGV, 4))
return result
"""
DEFAULT_BATCH_ROWS = 1000


@dataclass(frozen=True)
class _Layout:
    """Where a view's values live, computed once per view (murmur3 hashes, key prefix)."""

    view: FeatureView
    names: tuple[str, ...]
    dtypes: tuple[FieldType, ...]
    fields: tuple[bytes, ...]
    ts_field: bytes
    end_field: bytes
    key_prefix: bytes


def end_field(view_name: str) -> bytes:
    return f"_sluice_end_ms:{view_name}".encode()


class RedisOnlineStore(OnlineStore):
    """Batched, ordered writes and one-round-trip reads of a project's online feature rows."""

    def __init__(
        self, redis_url: str, project: str, *, batch_rows: int = DEFAULT_BATCH_ROWS
    ) -> None:
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        self.project = project
        self.batch_rows = batch_rows
        self._client = redis.Redis.from_url(redis_url)
        self._script = self._client.register_script(_WRITE_IF_NOT_OLDER)
        self._layouts: dict[str, _Layout] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(settings.redis_url, settings.feast_project)

    def ping(self) -> float:
        started = time.perf_counter()
        try:
            self._client.ping()
        except redis.RedisError as exc:
            raise OnlineStoreError(f"Redis did not answer a ping: {exc}") from exc
        return time.perf_counter() - started

    def close(self) -> None:
        self._client.close()

    def _layout(self, view: FeatureView) -> _Layout:
        cached = self._layouts.get(view.name)
        if cached is not None and (cached.view is view or cached.view == view):
            return cached
        if not view.online:
            # Feast registers such a view with online=False and will not serve it.
            raise OnlineStoreError(f"view {view.name!r} is not served online (online=False)")
        specs = view.features()
        layout = _Layout(
            view=view,
            names=tuple(s.name for s in specs),
            dtypes=tuple(s.dtype for s in specs),
            fields=tuple(codec.feature_field(view.name, s.name) for s in specs),
            ts_field=codec.timestamp_field(view.name),
            end_field=end_field(view.name),
            key_prefix=codec.entity_key_prefix(view.entity.join_key),
        )
        self._layouts[view.name] = layout
        return layout

    def _args(self, layout: _Layout, row: OnlineRow) -> list[bytes | int]:
        unknown = set(row.values) - set(layout.names)
        if unknown:
            raise OnlineStoreError(
                f"view {layout.view.name!r}, entity {row.entity_key!r}: "
                f"unknown features {sorted(unknown)}"
            )
        args: list[bytes | int] = [
            layout.end_field,
            layout.ts_field,
            row.window_end_ms,
            layout.ts_field,
            codec.encode_timestamp_ms(row.window_end_ms),
        ]
        for name, dtype, field in zip(layout.names, layout.dtypes, layout.fields, strict=True):
            if name not in row.values:
                # Every feature is written each time: a partial row would leave the previous
                # window's values of the missing features next to the new ones.
                raise OnlineStoreError(
                    f"view {layout.view.name!r}, entity {row.entity_key!r}: "
                    f"feature {name!r} is missing"
                )
            try:
                args += [field, codec.encode_value(row.values[name], dtype)]
            except TypeError as exc:
                raise OnlineStoreError(
                    f"view {layout.view.name!r}, entity {row.entity_key!r}: feature {name!r}: {exc}"
                ) from None
        return args

    def write(self, view: FeatureView, rows: Iterable[OnlineRow]) -> WriteReport:
        """Store rows, one pipeline per batch_rows rows; never an older window over a newer one.

        Rows are validated before their batch is sent; a bad row raises OnlineStoreError and
        earlier batches stay written (each row is atomic and rewriting is idempotent, so a
        retry of the whole input is safe).
        """
        layout = self._layout(view)
        report = WriteReport(0, 0, 0, 0, 0)
        iterator = iter(rows)
        while batch := list(islice(iterator, self.batch_rows)):
            args = [self._args(layout, row) for row in batch]
            try:
                with self._client.pipeline(transaction=False) as pipe:
                    for row, row_args in zip(batch, args, strict=True):
                        key = codec.entity_hash_key(layout.key_prefix, row.entity_key, self.project)
                        self._script(keys=[key], args=row_args, client=pipe)
                    results = pipe.execute()
            except redis.RedisError as exc:
                raise OnlineStoreError(f"view {view.name!r}: Redis write failed: {exc}") from exc
            report += WriteReport(
                rows=len(batch),
                written=sum(1 for r in results if r != 0),
                rewritten=sum(1 for r in results if r == 2),
                skipped_older=sum(1 for r in results if r == 0),
                pipelines=1,
            )
        return report

    def read_many(
        self, requests: Sequence[tuple[FeatureView, Sequence[str]]]
    ) -> list[list[OnlineRow | None]]:
        """read() of several views at once: one pipeline, so one round trip for all of them.

        The predictor reads every view of a batch of requests this way; results come back in
        the order of ``requests``, each list in the order of its keys.
        """
        layouts = [self._layout(view) for view, _ in requests]
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for layout, (_, keys) in zip(layouts, requests, strict=True):
                    fields = [*layout.fields, layout.ts_field, layout.end_field]
                    for key in keys:
                        hash_key = codec.entity_hash_key(layout.key_prefix, key, self.project)
                        # redis-py annotates names as str, but sends bytes keys (Feast's) as is.
                        pipe.hmget(hash_key, fields)  # type: ignore[arg-type]
                replies = pipe.execute()
        except redis.RedisError as exc:
            names = ", ".join(repr(view.name) for view, _ in requests)
            raise OnlineStoreError(f"view(s) {names}: Redis read failed: {exc}") from exc
        out: list[list[OnlineRow | None]] = []
        position = 0
        for layout, (_, keys) in zip(layouts, requests, strict=True):
            chunk = replies[position : position + len(keys)]
            position += len(keys)
            out.append(self._decode(layout, keys, chunk))
        return out

    @staticmethod
    def _decode(
        layout: _Layout, entity_keys: Sequence[str], replies: Sequence[Sequence[bytes | None]]
    ) -> list[OnlineRow | None]:
        view = layout.view
        n = len(layout.fields)
        out: list[OnlineRow | None] = []
        for key, reply in zip(entity_keys, replies, strict=True):
            ts, end = reply[n], reply[n + 1]
            if ts is None:
                out.append(None)
                continue
            try:
                values = {
                    name: codec.decode_value(data)
                    for name, data in zip(layout.names, reply[:n], strict=True)
                }
            except (ValueError, IndexError, UnicodeDecodeError) as exc:
                raise OnlineStoreError(
                    f"view {view.name!r}, entity {key!r}: undecodable value: {exc}"
                ) from None
            # Rows written by Feast itself have no end field; their _ts is the window end.
            end_ms = int(end) if end is not None else codec.decode_timestamp_ms(ts)
            out.append(OnlineRow(key, end_ms, values))
        return out
