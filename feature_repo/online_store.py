"""The online store seam: the interface every reader and writer of online rows relies on, and
the one factory that builds the store the settings name.

Every construction site (the stream's RowPublisher, the predictor, backfill materialization,
the demo, the benchmarks, the tests) calls ``open_online_store(settings)``; the scheme of the
store's URL (``settings.redis_url``) picks the implementation, imported only when chosen:

- ``redis://``, ``rediss://``: ``feature_repo/online.py`` (RedisOnlineStore), Feast's Redis
  layout, so Feast reads what Sluice writes.

A second store is one new module with a subclass of ``OnlineStore`` (``from_settings``,
``write``, ``read_many``, ``ping``, ``close``) plus one line in ``STORES``. (The redis_url
setting accepts redis URLs only today: its validator in core/settings.py widens with it.)
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import urlparse

from core.errors import SettingsError
from core.settings import Settings
from features.definitions import FeatureView, empty_value

# URL scheme -> "module:class" of the OnlineStore implementation behind it.
STORES: dict[str, str] = {
    "redis": "feature_repo.online:RedisOnlineStore",
    "rediss": "feature_repo.online:RedisOnlineStore",
}


@dataclass(frozen=True)
class OnlineRow:
    """The features of one entity for the window ending at window_end_ms (epoch ms).

    Writers set the first three fields. Readers (``read_many``) also say what the choice of
    features/contract.py needs: ``empty`` (every value is its aggregation's empty value: a
    closing row, see ``is_empty_row``) and ``previous``, the row this one replaced (the window
    end before it), kept so that a row written before it is servable does not hide the one
    still due; None when the store holds none. Neither takes part in equality: two rows are
    equal when entity, window end and values are.
    """

    entity_key: str
    window_end_ms: int
    values: Mapping[str, Any]
    previous: OnlineRow | None = field(default=None, compare=False)
    empty: bool | None = field(default=None, compare=False)  # None: not known (a writer's row)


def empty_values(view: FeatureView) -> dict[str, Any]:
    """Each feature's value over an empty window (count 0, sum 0.0, others null)."""
    return {spec.name: empty_value(spec.function) for spec in view.features()}


def is_empty_row(empties: Mapping[str, Any], values: Mapping[str, Any]) -> bool:
    """Whether every feature holds its empty value (``empty_values(view)``): a closing row.

    A row with events in its largest window has a non-empty value unless every event's column
    was null, so for a view with a count or a sum this reads "no event in any window".
    """
    for name, empty in empties.items():
        value = values.get(name)
        if empty is None:
            if value is not None:
                return False
        elif value is None or value != empty:
            return False
    return True


@dataclass(frozen=True)
class WriteReport:
    rows: int
    written: int  # rows stored, including same-end rewrites
    rewritten: int  # of those, rows whose window end equalled the stored one (idempotent)
    skipped_older: int  # rows older than the stored window end, refused
    pipelines: int  # round trips to the store

    def __add__(self, other: WriteReport) -> WriteReport:
        return WriteReport(
            self.rows + other.rows,
            self.written + other.written,
            self.rewritten + other.rewritten,
            self.skipped_older + other.skipped_older,
            self.pipelines + other.pipelines,
        )


class OnlineStore(ABC):
    """A project's online feature rows: per (view, entity) the row of the newest window end,
    and the one before it.

    What every implementation guarantees:
    - write() never stores a row over one with a newer window end, atomically per row, so
      concurrent writers (a backfill and the stream) never go back in time; a row with the
      same end is rewritten (replays are idempotent). Every feature of the view is written
      each time. Rows are checked before their batch is sent: a bad one raises
      OnlineStoreError naming view, entity and feature, and earlier batches stay written.
    - write() keeps the row it replaces by a strictly newer window end as the new row's
      ``previous`` (a same-end rewrite keeps the previous one as it was), so that a reader can
      serve the window due at t (features/contract.py) when the newest is not servable yet.
    - read_many() answers several views in one call (one round trip where the backend
      allows), in the order asked, None for an entity without a row; each row carries
      ``empty`` and ``previous`` (None when not kept). No ttl is applied: callers compare
      OnlineRow.window_end_ms with the window end they need.
    - A backend that fails or does not answer raises OnlineStoreError.
    """

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Settings) -> Self:
        """The store for these settings (what open_online_store calls)."""

    @abstractmethod
    def write(self, view: FeatureView, rows: Iterable[OnlineRow]) -> WriteReport:
        """Store rows; never an older window end over a newer one (see the class docstring)."""

    @abstractmethod
    def read_many(
        self,
        requests: Sequence[tuple[FeatureView, Sequence[str]]],
        *,
        as_of_ms: int | None = None,
    ) -> list[list[OnlineRow | None]]:
        """The stored row of each (view, entity key), per request in the order of its keys, with
        its ``previous`` row and ``empty`` flag (see OnlineRow).

        ``as_of_ms``: the earliest time t the caller will choose rows for (features/contract.py).
        A store may then leave ``previous`` out (None) where the newest row is servable at t
        (its end at most window_end_at(view, t)): the contract never serves the previous row
        there, at t or later. None: every kept previous row is returned."""

    def read(self, view: FeatureView, entity_keys: Sequence[str]) -> list[OnlineRow | None]:
        """The stored row of each entity of one view (None when it has none)."""
        return self.read_many([(view, entity_keys)])[0]

    def write_progress(
        self, view: FeatureView, subtask: int, parallelism: int, progress_ms: int
    ) -> None:
        """Publish a streaming subtask's progress: every row of ``view`` whose window ends at or
        before ``progress_ms`` is written (features/contract.py). A store that cannot keep it
        does nothing; its readers then judge rows alone."""
        return None

    def read_progress(self, views: Sequence[FeatureView], max_age_ms: int = 0) -> dict[str, int]:
        """The stream's progress per view, for the views that have one (one round trip where
        the backend allows). ``max_age_ms``: an answer read at most that long ago may be
        returned again (it can only be older, so it flags more, never less)."""
        return {}

    @abstractmethod
    def ping(self) -> float:
        """Seconds of one round trip to the backend; OnlineStoreError when it does not answer."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; the store is not used afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_online_store(settings: Settings) -> OnlineStore:
    """The online store settings.redis_url names, by its URL scheme (see STORES)."""
    scheme = urlparse(settings.redis_url).scheme
    target = STORES.get(scheme)
    if target is None:
        # The scheme only: the URL may hold a password.
        raise SettingsError(
            f"redis_url: no online store for scheme {scheme!r} "
            f"(known: {', '.join(f'{s}://' for s in STORES)})"
        )
    module_name, _, class_name = target.partition(":")
    store_class = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(store_class, type) and issubclass(store_class, OnlineStore)):
        raise TypeError(f"{target} is not an OnlineStore")
    return store_class.from_settings(settings)
