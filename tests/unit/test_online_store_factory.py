"""open_online_store: the URL scheme picks the store; an unknown scheme is a settings error; a
second store is one module plus one line in STORES (this file plays the module)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Self

import pytest

from core.errors import ExitCode, SettingsError
from core.settings import Settings, load_settings
from examples.delivery.features import restaurant_orders
from feature_repo import online_store
from feature_repo.errors import OnlineStoreError
from feature_repo.online import RedisOnlineStore
from feature_repo.online_store import OnlineRow, OnlineStore, WriteReport, open_online_store
from features.definitions import FeatureView
from infra.stack import free_port


class MemoryStore(OnlineStore):
    """A whole second store: rows in a dict, the monotonic window-end rule kept."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], OnlineRow] = {}
        self.closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls()

    def write(self, view: FeatureView, rows: Iterable[OnlineRow]) -> WriteReport:
        report = WriteReport(0, 0, 0, 0, 1)
        for row in rows:
            held = self.rows.get((view.name, row.entity_key))
            older = held is not None and held.window_end_ms > row.window_end_ms
            same = held is not None and held.window_end_ms == row.window_end_ms
            if not older:
                self.rows[(view.name, row.entity_key)] = row
            report += WriteReport(1, int(not older), int(same), int(older), 0)
        return report

    def read_many(
        self,
        requests: Sequence[tuple[FeatureView, Sequence[str]]],
        *,
        as_of_ms: int | None = None,
    ) -> list[list[OnlineRow | None]]:
        return [[self.rows.get((view.name, key)) for key in keys] for view, keys in requests]

    def ping(self) -> float:
        return 0.0

    def close(self) -> None:
        self.closed = True


def with_url(url: str) -> Settings:
    # model_copy skips validation: the factory's own check is what is tested here.
    return load_settings().model_copy(update={"redis_url": url})


def test_redis_urls_open_the_redis_store():
    for url in ("redis://127.0.0.1:6379/0", "rediss://cache.internal:6380/1"):
        settings = with_url(url)
        with open_online_store(settings) as store:  # connects on first use, not here
            assert isinstance(store, RedisOnlineStore)
            assert store.project == settings.feast_project


def test_an_unknown_scheme_is_a_settings_error_naming_the_setting_without_the_password():
    with pytest.raises(SettingsError) as caught:
        open_online_store(with_url("memcached://admin:s3cret@cache.internal:11211"))
    message = str(caught.value)
    assert "redis_url" in message
    assert "'memcached'" in message
    assert "redis://" in message  # what is known
    assert "s3cret" not in message
    assert caught.value.exit_code is ExitCode.USAGE


def test_a_second_store_is_one_module_plus_one_line(monkeypatch: pytest.MonkeyPatch):
    line = {"memory": f"{__name__}:MemoryStore"}
    monkeypatch.setattr(online_store, "STORES", online_store.STORES | line)
    store = open_online_store(with_url("memory://"))
    assert isinstance(store, MemoryStore)
    view = restaurant_orders
    with store:
        first = store.write(view, [OnlineRow("r1", 120_000, {"a": 2}), OnlineRow("r2", 60_000, {})])
        older = store.write(view, [OnlineRow("r1", 60_000, {"a": 1})])
        assert (first.written, older.skipped_older) == (2, 1)
        assert store.read(view, ["r1", "r3"]) == [OnlineRow("r1", 120_000, {"a": 2}), None]
    assert store.closed


def test_a_target_that_is_not_an_online_store_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(online_store, "STORES", {"odd": "feature_repo.online_store:WriteReport"})
    with pytest.raises(TypeError, match="not an OnlineStore"):
        open_online_store(with_url("odd://x"))


def test_ping_of_an_unreachable_redis_is_an_online_store_error():
    with (
        open_online_store(with_url(f"redis://127.0.0.1:{free_port()}/0")) as store,
        pytest.raises(OnlineStoreError, match="ping"),
    ):
        store.ping()
