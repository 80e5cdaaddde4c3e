"""The reference implementation on hand-computed cases: window assignment, boundaries,
empty windows, closing rows, ties, nulls, and the closed-window rule."""

from __future__ import annotations

import math

import pytest

from examples.delivery.sources import ORDERS
from features.definitions import Aggregation, AggregationFunction, Entity, FeatureView, Window
from features.reference import (
    aggregate,
    compute_view,
    current_window_end,
    empty_row,
    value_at,
    window_ends,
    with_closing_rows,
)

Agg = AggregationFunction
M = 60_000  # one minute in ms
W2 = Window.sliding("2m", every="1m")
W3 = Window.sliding("3m", every="1m")

VIEW = FeatureView(
    name="shop",
    entity=Entity(name="restaurant", join_key="restaurant_id"),
    source=ORDERS,
    filter="items < 50",
    derived={"per_item": "subtotal / items"},
    aggregations=(
        Aggregation(function=Agg.COUNT, windows=(W2, W3)),
        Aggregation(function=Agg.SUM, column="items", windows=(W2,)),
        Aggregation(function=Agg.MEAN, column="per_item", windows=(W3,)),
        Aggregation(function=Agg.LAST, column="zone_id", windows=(W3,)),
        Aggregation(function=Agg.COUNT_DISTINCT, column="zone_id", windows=(W3,)),
        Aggregation(function=Agg.STDDEV, column="subtotal", windows=(W3,)),
        Aggregation(function=Agg.MIN, column="subtotal", windows=(W2,)),
        Aggregation(function=Agg.MAX, column="subtotal", windows=(W2,)),
    ),
)


def order(t: int, key: str = "r1", items: int = 1, subtotal: float = 10.0, zone: str = "a"):
    return {
        "order_id": f"o{t}",
        "restaurant_id": key,
        "zone_id": zone,
        "items": items,
        "subtotal": subtotal,
        "distance_km": 1.0,
        "placed_at": t,
    }


def test_window_ends_cover_exactly_the_windows_containing_the_event():
    assert window_ends(0, W2) == [M, 2 * M]
    assert window_ends(M - 1, W2) == [M, 2 * M]
    assert window_ends(M, W2) == [2 * M, 3 * M]  # an event at an end belongs to the next
    tumbling = Window.tumbling("5m")
    assert window_ends(7 * M, tumbling) == [10 * M]
    assert current_window_end(3 * M, M) == 3 * M  # the window ending now is closed
    assert current_window_end(3 * M - 1, M) == 2 * M


def test_aggregates_on_hand_values():
    pairs = [(1, 2.0), (2, 4.0), (3, None), (3, 9.0)]
    assert aggregate(Agg.COUNT, pairs) == 4
    assert aggregate(Agg.SUM, pairs) == 15.0
    assert aggregate(Agg.MEAN, pairs) == 5.0
    assert aggregate(Agg.MIN, pairs) == 2.0
    assert aggregate(Agg.MAX, pairs) == 9.0
    assert aggregate(Agg.LAST, pairs) == 9.0
    assert aggregate(Agg.STDDEV, pairs) == pytest.approx(math.sqrt(13.0))
    assert aggregate(Agg.STDDEV, [(1, 2.0)]) is None
    assert aggregate(Agg.COUNT_DISTINCT, [(1, "a"), (2, "a"), (3, "b")]) == 2
    # Ties in time go to the greatest value, so every engine picks the same one.
    assert aggregate(Agg.LAST, [(5, "b"), (5, "c"), (5, "a"), (4, "z")]) == "c"
    assert aggregate(Agg.MEAN, []) is None
    assert aggregate(Agg.SUM, [(1, None)]) == 0.0


def test_compute_view_rows_filter_derived_and_empty_small_windows():
    events = [
        order(10, items=2, subtotal=10.0, zone="a"),
        order(M + 5, items=4, subtotal=20.0, zone="b"),
        order(M + 6, items=99, subtotal=1000.0),  # filtered out (items < 50)
        order(90, key="r2", items=1, subtotal=7.0),
    ]
    rows = compute_view(VIEW, events)
    # r1: events at 0:00.010 and 1:00.005 -> 3m windows end at 1..3 and 2..4 minutes.
    assert sorted(e // M for k, e in rows if k == "r1") == [1, 2, 3, 4]
    at2 = rows[("r1", 2 * M)]
    assert at2["count_2m"] == 2
    assert at2["sum_items_2m"] == 6.0
    assert at2["mean_per_item_3m"] == pytest.approx((5.0 + 5.0) / 2)
    assert at2["last_zone_id_3m"] == "b"
    assert at2["count_distinct_zone_id_3m"] == 2
    assert at2["stddev_subtotal_3m"] == pytest.approx(math.sqrt(50.0))
    assert (at2["min_subtotal_2m"], at2["max_subtotal_2m"]) == (10.0, 20.0)
    # At 4m only the 3m window [1m, 4m) holds the second event; the 2m window is empty.
    at4 = rows[("r1", 4 * M)]
    assert at4["count_2m"] == 0
    assert at4["sum_items_2m"] == 0.0
    assert at4["min_subtotal_2m"] is None
    assert at4["count_3m"] == 1
    assert at4["stddev_subtotal_3m"] is None


def test_closing_rows_and_closed_window_rule():
    events = [order(10), order(10 * M + 1)]
    rows = compute_view(VIEW, events)
    closed = with_closing_rows(VIEW, rows)
    added = set(closed) - set(rows)
    assert added == {("r1", 4 * M), ("r1", 14 * M)}
    assert closed[("r1", 4 * M)] == empty_row(VIEW)
    # Served values: the newest window whose servable time (end + lateness) is <= t.
    late = int(VIEW.lateness.total_seconds() * 1000)
    assert value_at(VIEW, rows, "r1", 2 * M - 1)["count_3m"] == 1  # window ending at 1m
    assert value_at(VIEW, rows, "r1", 3 * M + late)["count_3m"] == 1  # [0, 3m) servable
    assert value_at(VIEW, rows, "r1", 4 * M + late - 1)["count_3m"] == 1  # 4m not servable yet
    assert value_at(VIEW, rows, "r1", 4 * M + late)["count_3m"] == 0
    assert value_at(VIEW, rows, "r1", 5 * M)["count_3m"] == 0
    assert value_at(VIEW, rows, "r1", 5 * M)["mean_per_item_3m"] is None
    assert value_at(VIEW, rows, "nobody", 5 * M) == empty_row(VIEW)


def test_newest_servable_row_equals_value_at_given_closing_rows():
    """The property the offline/online stores rely on: newest row with end + lateness <= t."""
    late = int(VIEW.lateness.total_seconds() * 1000)
    events = [order(t * 7_919 % (40 * M), key=f"r{t % 3}") for t in range(60)]
    rows = compute_view(VIEW, events)
    closed = with_closing_rows(VIEW, rows)
    for key in ("r0", "r1", "r2"):
        ends = sorted(e for k, e in closed if k == key)
        for t in range(0, 45 * M, 13_001):
            older = [e for e in ends if e + late <= t]
            served = closed[(key, older[-1])] if older else empty_row(VIEW)
            assert served == value_at(VIEW, rows, key, t)
