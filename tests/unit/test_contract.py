"""The availability contract (features/contract.py), rule by rule."""

from __future__ import annotations

from datetime import timedelta

import pytest

from examples.delivery.features import restaurant
from examples.delivery.sources import ORDERS
from features.contract import (
    RowStatus,
    StoredRow,
    choose_row,
    servable_at_ms,
    window_end_at,
)
from features.definitions import Aggregation, AggregationFunction, FeatureView, Window
from features.errors import FeatureDefinitionError

MIN = 60_000


def view(lateness_s: int = 5) -> FeatureView:
    return FeatureView(
        name="orders_5m",
        entity=restaurant,
        source=ORDERS,
        aggregations=(
            Aggregation(
                function=AggregationFunction.COUNT, windows=(Window.sliding("5m", every="1m"),)
            ),
        ),
        lateness=timedelta(seconds=lateness_s),
    )


def test_a_window_is_servable_at_its_end_plus_lateness():
    v = view()
    assert servable_at_ms(v, 10 * MIN) == 10 * MIN + 5_000


@pytest.mark.parametrize(
    ("t_ms", "expected_end"),
    [
        (10 * MIN + 4_999, 9 * MIN),  # one millisecond before servable: the previous window
        (10 * MIN + 5_000, 10 * MIN),  # exactly servable
        (10 * MIN + 59_999, 10 * MIN),
        (11 * MIN + 4_999, 10 * MIN),
    ],
)
def test_the_window_to_serve_is_the_newest_servable(t_ms, expected_end):
    assert window_end_at(view(), t_ms) == expected_end


def test_a_row_written_early_is_not_served_before_its_time():
    v = view()
    t = 10 * MIN + 3_000  # E(t) = 9 min; the stream already wrote 10 min
    newest, previous = StoredRow(10 * MIN, empty=False), StoredRow(9 * MIN, empty=False)
    assert choose_row(v, t, newest, previous) == (previous, RowStatus.EXACT)
    assert choose_row(v, t + 2_000, newest, previous) == (newest, RowStatus.EXACT)


def test_an_older_non_empty_row_is_behind_the_contract():
    v = view()
    row = StoredRow(8 * MIN, empty=False)
    assert choose_row(v, 10 * MIN + 6_000, row, None) == (row, RowStatus.BEHIND)


def test_an_older_closing_row_is_exact_empty():
    v = view()
    closing = StoredRow(8 * MIN, empty=True)
    assert choose_row(v, 10 * MIN + 6_000, closing, None) == (closing, RowStatus.EXACT)


def test_no_row_or_only_an_unservable_first_row_is_missing():
    v = view()
    assert choose_row(v, 10 * MIN, None, None) == (None, RowStatus.MISSING)
    first = StoredRow(11 * MIN, empty=False)
    assert choose_row(v, 10 * MIN + 30_000, first, None) == (None, RowStatus.MISSING)


def test_the_streams_progress_below_the_due_window_makes_missing_and_closing_rows_behind():
    v = view()
    t = 10 * MIN + 6_000  # E(t) = 10 min
    closing = StoredRow(8 * MIN, empty=True)
    first = StoredRow(11 * MIN, empty=False)
    # The stream has not finished E(t): an event of it may be in flight.
    for progress in (9 * MIN, 10 * MIN - 1):
        assert choose_row(v, t, None, None, progress) == (None, RowStatus.BEHIND)
        assert choose_row(v, t, closing, None, progress) == (closing, RowStatus.BEHIND)
        assert choose_row(v, t, first, None, progress) == (None, RowStatus.BEHIND)
    # Finished E(t) (or no progress published): as without the marker.
    finished: tuple[int | None, ...] = (10 * MIN, 12 * MIN, None)
    for done in finished:
        assert choose_row(v, t, None, None, done) == (None, RowStatus.MISSING)
        assert choose_row(v, t, closing, None, done) == (closing, RowStatus.EXACT)
        assert choose_row(v, t, first, None, done) == (None, RowStatus.MISSING)


def test_the_row_of_the_due_window_is_exact_whatever_the_progress():
    v = view()
    row = StoredRow(10 * MIN, empty=False)
    older = StoredRow(9 * MIN, empty=False)
    assert choose_row(v, 10 * MIN + 6_000, row, None, 0) == (row, RowStatus.EXACT)
    assert choose_row(v, 10 * MIN + 6_000, older, None, 0) == (older, RowStatus.BEHIND)


def test_lateness_must_exceed_the_sources_allowed_lateness():
    with pytest.raises(FeatureDefinitionError, match="lateness"):
        view(lateness_s=2)  # ORDERS waits 2 s for late events


def test_lateness_must_not_run_more_than_a_slide_ahead():
    with pytest.raises(FeatureDefinitionError, match="lateness"):
        view(lateness_s=63)
