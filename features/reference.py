"""Pure Python reference implementation of window assignment and of every view's rows.

Slow on purpose and easy to read: both engines are tested against it. Each window's values
are folded one by one into the aggregation objects of features/aggregations.py, which define
what every function computes. Input events are canonical dicts (as the validating ingest
emits them: timestamps in epoch milliseconds).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from features.aggregations import AGGREGATIONS
from features.contract import window_end_at
from features.definitions import AggregationFunction, FeatureView, Window, empty_value
from features.expressions import compile_python, parse

Event = Mapping[str, Any]
RowKey = tuple[str, int]  # (entity key, window end in epoch ms)


def window_ends(event_time_ms: int, window: Window) -> list[int]:
    """Ends of every window [end - size, end) that contains the event, oldest first."""
    slide, size = window.slide_ms, window.size_ms
    first = (event_time_ms // slide + 1) * slide  # smallest end > t
    return list(range(first, event_time_ms + size + 1, slide))


def current_window_end(t_ms: int, slide_ms: int) -> int:
    """End of the newest closed window at time t: the window whose value is served at t."""
    return (t_ms // slide_ms) * slide_ms


def aggregate(function: AggregationFunction, values: Sequence[tuple[int, Any]]) -> Any:
    """Aggregate (event_time, value) pairs in arrival order, one value at a time; nulls are
    skipped (count counts events). No tiles and no merges: those are the engines' business."""
    aggregator = AGGREGATIONS[function]
    return aggregator.result(aggregator.of(values))


def prepare(view: FeatureView, events: Iterable[Event]) -> list[dict[str, Any]]:
    """Derived columns, then the filter: the rows that enter windows."""
    derived = [(name, compile_python(parse(text))) for name, text in view.derived.items()]
    keep = compile_python(parse(view.filter)) if view.filter else None
    rows = []
    for event in events:
        row = dict(event)
        for name, fn in derived:
            row[name] = fn(row)
        if keep is None or keep(row) is True:
            rows.append(row)
    return rows


def compute_view(view: FeatureView, events: Iterable[Event]) -> dict[RowKey, dict[str, Any]]:
    """Every (entity, window end) whose largest window holds an event, with all features.

    Smaller windows that are empty at such an end carry their empty values.
    """
    time_field = view.source.event_time_field
    specs = view.features()
    largest = view.max_window
    # (entity, end) -> window name -> column -> [(t, value)]
    members: dict[RowKey, dict[str, list[Event]]] = defaultdict(lambda: defaultdict(list))
    for row in prepare(view, events):
        key, t = row[view.key_column], row[time_field]
        for end in window_ends(t, largest):
            bucket = members[(key, end)]
            for window in view.windows:
                if end - window.size_ms <= t:
                    bucket[window.name].append(row)
    result: dict[RowKey, dict[str, Any]] = {}
    for row_key, by_window in members.items():
        values = {}
        for spec in specs:
            rows = by_window.get(spec.window.name, [])
            pairs = [(r[time_field], r[spec.column] if spec.column else 1) for r in rows]
            values[spec.name] = aggregate(spec.function, pairs)
        result[row_key] = values
    return result


def with_closing_rows(
    view: FeatureView, rows: Mapping[RowKey, Mapping[str, Any]]
) -> dict[RowKey, dict[str, Any]]:
    """Rows plus one "closing" row of empty values at the first empty end after each run.

    Stores that answer "the newest row at or before t" (Feast's offline point-in-time join,
    the online store) then give exactly the closed-window value: an entity whose windows all
    emptied reads count 0 and null means, not the last busy window's values.
    """
    out = {k: dict(v) for k, v in rows.items()}
    slide = view.slide_ms
    for key, end in rows:
        if (key, end + slide) not in rows:
            out[(key, end + slide)] = empty_row(view)
    return out


def empty_row(view: FeatureView) -> dict[str, Any]:
    return {spec.name: empty_value(spec.function) for spec in view.features()}


def value_at(
    view: FeatureView, rows: Mapping[RowKey, Mapping[str, Any]], key: str, t_ms: int
) -> dict[str, Any]:
    """Feature values of an entity at time t under the availability contract: the row of the
    newest window whose servable time (end + view.lateness) is <= t (features/contract.py)."""
    row = rows.get((key, window_end_at(view, t_ms)))
    return dict(row) if row is not None else empty_row(view)
