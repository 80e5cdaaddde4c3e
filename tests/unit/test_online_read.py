"""The online read path without Redis: rows built for speed (feature_repo/online.py) equal
OnlineRow's own, replies are read through redis-py's parser when it is not hiredis', and a
prediction batch reads as of its earliest t (so the store may leave out previous rows)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from feature_repo.online_rows import row_of as _row
from feature_repo.online_store import OnlineRow
from feature_repo.redis_wire import read_replies as _read_replies
from features.definitions import FeatureView


@pytest.mark.parametrize("empty", [True, False])
def test_a_fast_row_is_the_row_init_builds(empty: bool) -> None:
    previous = OnlineRow("k", 1, {"a": 1.0}, None, False)
    fast = _row("k", 2, {"a": None}, previous, empty)
    slow = OnlineRow("k", 2, {"a": None}, previous, empty)
    assert fast == slow
    assert vars(fast) == vars(slow)
    assert repr(fast) == repr(slow)
    assert fast != _row("k", 3, {"a": None}, previous, empty)
    with pytest.raises(AttributeError):  # still frozen
        fast.window_end_ms = 5  # type: ignore[misc]


class _PlainConnection:
    """A connection whose parser is not hiredis': replies come from read_response."""

    _parser = object()

    def __init__(self, replies: list[Any]) -> None:
        self.replies = replies

    def read_response(self) -> Any:
        return self.replies.pop(0)


def test_replies_come_from_read_response_without_hiredis() -> None:
    connection = _PlainConnection([[b"1"], [None], [b"3"]])
    assert _read_replies(connection, 2) == [[b"1"], [None]]
    assert connection.replies == [[b"3"]]


class _Recording:
    """A FeatureReader that records the as_of_ms it is given and answers no rows."""

    def __init__(self) -> None:
        self.as_of: list[int | None] = []

    def read_many(
        self,
        requests: Sequence[tuple[FeatureView, Sequence[str]]],
        *,
        as_of_ms: int | None = None,
    ) -> list[list[OnlineRow | None]]:
        self.as_of.append(as_of_ms)
        return [[None for _ in keys] for _, keys in requests]

    def read_progress(self, views: Sequence[FeatureView], max_age_ms: int = 0) -> dict[str, int]:
        return {}


def test_a_batch_reads_as_of_its_earliest_t() -> None:
    from examples.delivery.features import delivery_eta
    from serving.features import build_plan, read_rows
    from serving.model import PredictItem, earliest_t

    refs = [f"{v.name}:{s.name}" for v in delivery_eta.views for s in v.features()][:3]
    plan = build_plan(delivery_eta, refs)
    row = {"restaurant_id": "r1", "zone_id": "z1"}
    items: list[Any] = [PredictItem(None, row, 5_000), PredictItem(None, row, None)]  # type: ignore[arg-type]
    assert earliest_t(items, now_ms=9_000) == 5_000
    assert earliest_t(items[1:], now_ms=9_000) == 9_000  # no t: now
    assert earliest_t([], now_ms=9_000) == 9_000
    reader = _Recording()
    read_rows(reader, [(plan, row)], as_of_ms=5_000)
    read_rows(reader, [(plan, row)])
    assert reader.as_of == [5_000, None]


def test_predict_batch_reads_as_of_the_batchs_earliest_t(tmp_path: Any) -> None:
    from examples.delivery.features import delivery_eta
    from serving.model import PredictItem, load_model, predict_batch
    from tests.helpers.serving import trained_registry

    registry = trained_registry(tmp_path, delivery_eta)
    model = load_model(registry, {delivery_eta.name: delivery_eta}, delivery_eta.name, 1)
    row = {"restaurant_id": "r1", "zone_id": "z1", "distance_km": 1.0, "hour_of_day": 3}
    row |= {"items": 2}
    reader = _Recording()
    items = [PredictItem(model, row, 7_000), PredictItem(model, row, 6_000)]
    predictions = predict_batch(reader, items, now_ms=9_000)
    assert len(predictions) == 2
    assert reader.as_of == [6_000]
