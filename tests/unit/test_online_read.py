"""feature_repo/online.py's read path without Redis: rows built for speed equal OnlineRow's own,
and replies are read through redis-py's parser when it is not hiredis'."""

from __future__ import annotations

from typing import Any

import pytest

from feature_repo.online import _read_replies, _row
from feature_repo.online_store import OnlineRow


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
