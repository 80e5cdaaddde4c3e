"""RedisOnlineStore: the OnlineStore (online_store.py) that keeps rows in Feast's Redis layout.

Spark backfills, the Flink job and the predictor reach it through open_online_store(settings)
for redis:// and rediss:// URLs, so the layout lives in one place (see codec.py). What it adds
to Feast's layout, per entity and view (in the same hash, in fields Feast never reads):

- "_sluice_end_ms:<view>": the window end of the newest row (Feast's fields hold the row).
  A Lua script compares it and writes the row in one atomic step, so concurrent writers (a
  backfill and the stream) can never put an older window over a newer one; Feast's own write
  path compares timestamps in Python between two round trips and can.
- the previous row (features/contract.py: the stream may write the row of E + slide before it
  is servable, while requests still need E's): when a strictly newer window end arrives, the
  script first copies the current row's values to "_sluice_prev:" + Feast's 4-byte field of
  each feature (never a Feast field: those are exactly 4 bytes, or start with "_ts:") and its
  end to "_sluice_prev_end_ms:<view>". A same-end rewrite leaves the previous row alone; an
  older end is refused. Feast's reads and its delete_table (which keys on "_ts:") see the
  newest row only, unchanged.

Rows written by other tools (Feast's write_to_online_store, materialize) are read correctly
(their _ts is the Feast source's timestamp, the servable time: the window end is _ts minus
the view's lateness); a write over them is not ordered against them, since they carry no end,
and does not keep them as previous.
read_many answers each row with its previous one and whether all its windows are empty (a
closing row), in one pipeline round trip.

Feast does not apply a view's ttl to online reads (nor does read() here): callers compare
OnlineRow.window_end_ms with the current window end to judge freshness.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any, Self

import redis

from core.settings import Settings
from feature_repo import codec, progress
from feature_repo.errors import OnlineStoreError, OnlineStoreUnavailableError
from feature_repo.online_rows import Layout, decode_rows
from feature_repo.online_store import (
    OnlineRow,
    OnlineStore,
    WriteReport,
    empty_values,
)
from feature_repo.redis_wire import (
    RedisPipe,
    pairs,
    read_replies,
    resp_array_head,
    resp_bulk,
    resp_command,
)
from features.contract import lateness_ms, window_end_at
from features.definitions import FeatureView

# OnlineRow and WriteReport are importable from here, as before the interface existed.
__all__ = [
    "DEFAULT_BATCH_ROWS",
    "OnlineRow",
    "RedisOnlineStore",
    "WriteReport",
    "end_field",
    "previous_end_field",
    "previous_field",
]

PREVIOUS_PREFIX = b"_sluice_prev:"
# KEYS[1]: the entity's hash. ARGV[1]: the end field, ARGV[2]: Feast's _ts field, ARGV[3]: the
# row's window end (ms), ARGV[4]: the previous row's end field, ARGV[5..]: field/value pairs
# (_ts first, then every feature).
# Returns 0 when a newer row is stored (nothing written), 1 when written, 2 when the same window
# end was rewritten, 3 when written and the row it replaced kept as the previous one. The stored
# end counts only next to its _ts field: when Feast deletes a view's fields (apply after
# removing the view) the stale end must not block the view's next life, nor may that life's
# first row inherit a previous row, so the previous end is dropped then.
_WRITE_IF_NOT_OLDER = """
local stored = redis.call('HMGET', KEYS[1], ARGV[1], ARGV[2])
local result = 1
if stored[1] and stored[2] then
  local old, new = tonumber(stored[1]), tonumber(ARGV[3])
  if old > new then return 0 end
  if old == new then
    result = 2
  else
    local names = {}
    for i = 7, #ARGV, 2 do names[#names + 1] = ARGV[i] end
    local current = redis.call('HMGET', KEYS[1], unpack(names))
    local moved = {ARGV[4], stored[1]}
    for i, name in ipairs(names) do
      moved[#moved + 1] = '{PREVIOUS_PREFIX}' .. name
      moved[#moved + 1] = current[i] or ''
    end
    redis.call('HSET', KEYS[1], unpack(moved))
    result = 3
  end
else
  redis.call('HDEL', KEYS[1], ARGV[4])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], unpack(ARGV, 5))
return result
""".replace("{PREVIOUS_PREFIX}", PREVIOUS_PREFIX.decode())
DEFAULT_BATCH_ROWS = 1000
KEY_CACHE = 16_384  # encoded hash keys kept per view (about 1.5 MB)


def end_field(view_name: str) -> bytes:
    return f"_sluice_end_ms:{view_name}".encode()


def previous_end_field(view_name: str) -> bytes:
    return f"_sluice_prev_end_ms:{view_name}".encode()


def previous_field(feast_field: bytes) -> bytes:
    """Where the previous row keeps the value Feast keeps in ``feast_field`` (4 bytes)."""
    return PREVIOUS_PREFIX + feast_field


def _read_error(
    requests: Sequence[tuple[FeatureView, Sequence[str]]], exc: redis.RedisError
) -> OnlineStoreError:
    names = ", ".join(repr(view.name) for view, _ in requests)
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return OnlineStoreUnavailableError(f"view(s) {names}: Redis did not answer: {exc}")
    return OnlineStoreError(f"view(s) {names}: Redis read failed: {exc}")


def _progress_error(exc: redis.RedisError) -> OnlineStoreError:
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return OnlineStoreUnavailableError(f"progress: Redis did not answer: {exc}")
    return OnlineStoreError(f"progress: Redis read failed: {exc}")


class RedisOnlineStore(OnlineStore):
    """Batched, ordered writes and one-round-trip reads of a project's online feature rows."""

    def __init__(
        self,
        redis_url: str,
        project: str,
        *,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        connect_timeout_s: float | None = None,
        timeout_s: float | None = None,
        read_timeout_s: float | None = None,
    ) -> None:
        """Timeouts (None: wait forever, redis-py's default): connecting, any reply (writes),
        and the replies of read_many and ping, which the predictor waits on per request.
        Reads use their own connection pool, so a writer's long timeout never applies to them."""
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        self.project = project
        self.batch_rows = batch_rows
        self._client = redis.Redis.from_url(
            redis_url, socket_connect_timeout=connect_timeout_s, socket_timeout=timeout_s
        )
        self._reads = redis.Redis.from_url(
            redis_url,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=read_timeout_s if read_timeout_s is not None else timeout_s,
        )
        self._script = self._client.register_script(_WRITE_IF_NOT_OLDER)
        self._layouts: dict[str, Layout] = {}
        self._progress: dict[str, tuple[float, int | None]] = {}  # view -> (read at, progress)
        pool = self._reads.connection_pool
        # The predictor's reads on its event loop (feature_repo/redis_wire.py), when possible.
        self._pipe = (
            RedisPipe(pool.connection_kwargs, pool.connection_kwargs.get("socket_timeout"))
            if RedisPipe.supported(pool)
            else None
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(
            settings.redis_url,
            settings.feast_project,
            connect_timeout_s=settings.redis_connect_timeout_ms / 1000,
            timeout_s=settings.redis_timeout_ms / 1000,
            read_timeout_s=settings.redis_read_timeout_ms / 1000,
        )

    def ping(self) -> float:
        started = time.perf_counter()
        try:
            self._reads.ping()
        except redis.RedisError as exc:
            raise OnlineStoreUnavailableError(f"Redis did not answer a ping: {exc}") from exc
        return time.perf_counter() - started

    def close(self) -> None:
        self._client.close()
        self._reads.close()
        if self._pipe is not None:
            self._pipe.close()

    def _layout(self, view: FeatureView) -> Layout:
        cached = self._layouts.get(view.name)
        if cached is not None and (cached.view is view or cached.view == view):
            return cached
        if not view.online:
            # Feast registers such a view with online=False and will not serve it.
            raise OnlineStoreError(f"view {view.name!r} is not served online (online=False)")
        specs = view.features()
        fields = tuple(codec.feature_field(view.name, s.name) for s in specs)
        ts, end, previous_end = (
            codec.timestamp_field(view.name),
            end_field(view.name),
            previous_end_field(view.name),
        )
        read_fields = [*fields, ts, end, *map(previous_field, fields), previous_end]
        layout = Layout(
            view=view,
            names=tuple(s.name for s in specs),
            dtypes=tuple(s.dtype for s in specs),
            fields=fields,
            ts_field=ts,
            end_field=end,
            previous_end_field=previous_end,
            key_prefix=codec.entity_key_prefix(view.entity.join_key),
            empty_list=list(empty_values(view).values()),
            lateness_ms=lateness_ms(view),
            hmget_head=resp_array_head(2 + len(read_fields)) + resp_bulk(b"HMGET"),
            hmget_fields=b"".join(map(resp_bulk, read_fields)),
            bulk_keys={},
        )
        self._layouts[view.name] = layout
        return layout

    def _args(self, layout: Layout, row: OnlineRow) -> list[bytes | int]:
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
            layout.previous_end_field,
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

        A row with a strictly newer window end keeps the one it replaces as the previous row.

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
        self,
        requests: Sequence[tuple[FeatureView, Sequence[str]]],
        *,
        as_of_ms: int | None = None,
    ) -> list[list[OnlineRow | None]]:
        """read() of several views at once: one pipeline, so one round trip for all of them.

        The predictor reads every view of a batch of requests this way; results come back in
        the order of ``requests``, each list in the order of its keys. Each row carries its
        previous row (one HMGET asks for both) and whether its windows are all empty; with
        ``as_of_ms``, the previous row only where the newest is not servable at as_of_ms
        (OnlineStore.read_many).
        """
        layouts, commands, count = self._pack(requests)
        try:
            replies = self._pipelined(commands, count) if count else []
        except redis.RedisError as exc:
            raise _read_error(requests, exc) from exc
        return self._unpack(layouts, requests, replies, as_of_ms)

    async def read_many_async(
        self,
        requests: Sequence[tuple[FeatureView, Sequence[str]]],
        *,
        as_of_ms: int | None = None,
    ) -> list[list[OnlineRow | None]]:
        """read_many on the running event loop's own connection (feature_repo/redis_wire.py);
        only when ``reads_async`` is true."""
        assert self._pipe is not None
        layouts, commands, count = self._pack(requests)
        try:
            replies = await self._pipe.call(commands, count) if count else []
        except redis.RedisError as exc:
            raise _read_error(requests, exc) from exc
        return self._unpack(layouts, requests, replies, as_of_ms)

    @property
    def reads_async(self) -> bool:
        return self._pipe is not None

    def _pack(
        self, requests: Sequence[tuple[FeatureView, Sequence[str]]]
    ) -> tuple[list[Layout], bytes, int]:
        """The layouts of the views, the HMGETs packed, and how many."""
        layouts = [self._layout(view) for view, _ in requests]
        # The commands are packed here from each layout's pre-encoded fields: redis-py's
        # per-command packing and pipeline bookkeeping cost more than Redis answering them.
        parts: list[bytes] = []
        for layout, (_, keys) in zip(layouts, requests, strict=True):
            head, fields, cached = layout.hmget_head, layout.hmget_fields, layout.bulk_keys
            for key in keys:
                bulk = cached.get(key)
                if bulk is None:
                    if len(cached) >= KEY_CACHE:
                        cached.clear()
                    hash_key = codec.entity_hash_key(layout.key_prefix, key, self.project)
                    bulk = cached[key] = resp_bulk(hash_key)
                parts += (head, bulk, fields)
        return layouts, b"".join(parts), len(parts) // 3

    def _unpack(
        self,
        layouts: list[Layout],
        requests: Sequence[tuple[FeatureView, Sequence[str]]],
        replies: Sequence[Any],
        as_of_ms: int | None,
    ) -> list[list[OnlineRow | None]]:
        out: list[list[OnlineRow | None]] = []
        position = 0
        for layout, (_, keys) in zip(layouts, requests, strict=True):
            chunk = replies[position : position + len(keys)]
            position += len(keys)
            target = None if as_of_ms is None else window_end_at(layout.view, as_of_ms)
            out.append(decode_rows(layout, keys, chunk, target))
        return out

    def write_progress(
        self, view: FeatureView, subtask: int, parallelism: int, progress_ms: int
    ) -> None:
        try:
            progress.publish(
                self._client, self.project, view.name, subtask, parallelism, progress_ms
            )
        except redis.RedisError as exc:
            raise OnlineStoreError(f"view {view.name!r}: progress write failed: {exc}") from exc

    def read_progress(self, views: Sequence[FeatureView], max_age_ms: int = 0) -> dict[str, int]:
        stale = self._stale_progress(views, max_age_ms)
        if stale:
            try:
                settled = progress.read(self._reads, self.project, stale)
            except redis.RedisError as exc:
                raise _progress_error(exc) from exc
            self._cache_progress(stale, settled)
        return self._cached_progress(views)

    async def read_progress_async(
        self, views: Sequence[FeatureView], max_age_ms: int = 0
    ) -> dict[str, int]:
        """read_progress on the event loop's connection (as read_many_async)."""
        assert self._pipe is not None
        stale = self._stale_progress(views, max_age_ms)
        if stale:
            keys = [progress.progress_key(self.project, name) for name in stale]
            commands = b"".join(resp_command("HGETALL", key) for key in keys)
            try:
                replies = await self._pipe.call(commands, len(keys))
            except redis.RedisError as exc:
                raise _progress_error(exc) from exc
            settled = [progress.settled_progress(pairs(reply)) for reply in replies]
            self._cache_progress(stale, settled)
        return self._cached_progress(views)

    def _stale_progress(self, views: Sequence[FeatureView], max_age_ms: int) -> list[str]:
        now, never = time.monotonic(), (float("-inf"), None)
        cached = self._progress
        return [v.name for v in views if now - cached.get(v.name, never)[0] > max_age_ms / 1000]

    def _cache_progress(self, names: Sequence[str], settled: Sequence[int | None]) -> None:
        now = time.monotonic()
        self._progress.update(
            (name, (now, value)) for name, value in zip(names, settled, strict=True)
        )

    def _cached_progress(self, views: Sequence[FeatureView]) -> dict[str, int]:
        found = ((v.name, self._progress[v.name][1]) for v in views)
        return {name: value for name, value in found if value is not None}

    def _pipelined(self, commands: bytes, count: int) -> list[Any]:
        """Send packed commands in one write and read their ``count`` replies: one round trip.

        Reads are idempotent, so a pooled connection that went stale (Redis restarted) is
        retried once on a fresh one, as redis-py's pipeline does. A timeout is not retried: a
        Redis that did not answer within the read timeout would only make the caller wait
        twice as long (the predictor's deadline counts on one timeout per read).
        """
        pool = self._reads.connection_pool
        for attempt in (1, 2):
            connection = pool.get_connection()
            try:
                connection.send_packed_command([commands])
                return read_replies(connection, count)
            except redis.TimeoutError:
                connection.disconnect()  # replies may still arrive on it
                raise
            except redis.ConnectionError:
                connection.disconnect()
                if attempt == 2:
                    raise
            except BaseException:
                connection.disconnect()  # replies may be left unread on it
                raise
            finally:
                pool.release(connection)
        raise AssertionError("unreachable")
