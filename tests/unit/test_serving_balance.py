"""serving/balance.py's board: what a worker sees of the others (no server needed)."""

from __future__ import annotations

import time

import pytest

from serving import balance
from serving.balance import ConnectionBoard


@pytest.fixture
def board(tmp_path):
    path = tmp_path / balance.BOARD_FILE
    ConnectionBoard.create(path, 3)
    opened = ConnectionBoard(path)
    yield opened
    opened.close()


def test_a_worker_alone_may_always_accept(board):
    assert board.fewest_elsewhere(0) is None
    board.publish(0, 5)
    assert board.fewest_elsewhere(0) is None  # its own count is not another's


def test_the_fewest_of_the_live_others(board, tmp_path):
    other = ConnectionBoard(tmp_path / balance.BOARD_FILE)  # another process's view
    board.publish(0, 4)
    other.publish(1, 2)
    other.publish(2, 3)
    assert board.fewest_elsewhere(0) == 2
    assert board.fewest_elsewhere(1) == 3
    other.close()


def test_a_worker_that_stopped_ticking_does_not_hold_the_others_back(board, monkeypatch):
    board.publish(1, 0)  # then dies: its 0 would keep every other worker from accepting
    board.publish(2, 6)
    assert board.fewest_elsewhere(0) == 0
    later = time.monotonic_ns() + int(2 * balance.STALE_S * 1e9)
    monkeypatch.setattr(balance, "_now_ns", lambda: later)
    board.publish(2, 6)
    assert board.fewest_elsewhere(0) == 6
