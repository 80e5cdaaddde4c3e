"""Online features for a batch of prediction rows: one read, then a join in the model's order.

Which row (features/contract.py, the availability contract): each request row has a time t,
the server's clock when the request arrived or the row's ``event_time`` (replays). Per view,
the store answers the newest row and the one before it; ``choose_row`` picks the row whose
window is the newest servable at t (end + view.lateness <= t), exactly as training did:

- EXACT: the row of E(t), or a closing row (all windows empty) from before it, whose empty
  values are E(t)'s too. A row written before it is servable (the stream closes windows early)
  is never served: its previous row is.
- BEHIND: the newest servable row is older than E(t) and not empty: the stream is late. What
  is served then is the ``serve_behind`` setting's choice: "flag" (the older row) or "empty"
  (the view's empty values), the view listed under ``behind`` either way; "reject" is the
  route's (a 503 naming the views).
- MISSING: no row at all, or only a first row that is not servable yet.

Defaults (the documented contract of the predictor):
- An entity with no servable row for a view (never seen, not materialized yet, or its first
  row not servable yet) gets the view's empty values, exactly what a training row gets for an
  empty window: count and count_distinct 0, sum 0.0, everything else null. The answer lists
  the view under ``missing``.
- A null value (mean, min, max, last or stddev of an empty window) stays null; the model gets
  NaN, which LightGBM routes down each split's learned missing-value branch, as in training.
  The answer lists such features as "view:feature" under ``missing`` too.
- A row older than its view's ttl is still used (Feast does the same online) but its view is
  listed under ``stale``; ``feature_ages_ms`` gives now minus the served row's window end per
  view, ``window_ends_ms`` that window end (null when no row's values were served).
- When the store is slow or down (or the request's deadline comes first), a row may be served
  without reading it at all (``degraded_join``): every view's empty values, every view listed
  under ``degraded``; serving/deadlines.py says when.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from feature_repo.online_store import OnlineRow, empty_values, is_empty_row
from features.contract import RowStatus, StoredRow, choose_row
from features.definitions import FeatureService, FeatureView, empty_value
from features.schema import Field, FieldType
from serving.errors import ModelIncompatibleError

_NUMERIC = (FieldType.INT, FieldType.FLOAT, FieldType.BOOL)
ServeBehind = Literal["flag", "empty", "reject"]


class FeatureReader(Protocol):
    """What the predictor needs of the online store (feature_repo.online_store.OnlineStore)."""

    def read_many(
        self,
        requests: Sequence[tuple[FeatureView, Sequence[str]]],
        *,
        as_of_ms: int | None = None,
    ) -> list[list[OnlineRow | None]]: ...

    def read_progress(
        self, views: Sequence[FeatureView], max_age_ms: int = 0
    ) -> dict[str, int]: ...


# How old the stream's progress may be when a batch reads it: one read per 100 ms per process,
# not one per batch. An older progress is a lower one: it can only flag more rows `behind`
# (a row due at t is servable only `lateness` after its window ends, seconds after the stream
# has usually finished it).
PROGRESS_MAX_AGE_MS = 100


@dataclass(frozen=True)
class _Input:
    ref: str
    view: FeatureView | None  # None for a request feature
    name: str  # feature name in the view, or request field name
    default: Any


@dataclass(frozen=True)
class FeaturePlan:
    """How to build one model's input vector from online rows and request fields."""

    service: FeatureService
    inputs: tuple[_Input, ...]
    views: tuple[FeatureView, ...]
    request_fields: tuple[Field, ...]
    empties: Mapping[str, Mapping[str, Any]]  # view -> feature -> its empty value

    @property
    def refs(self) -> tuple[str, ...]:
        return tuple(i.ref for i in self.inputs)

    @property
    def entity_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(v.entity.join_key for v in self.views))


def build_plan(service: FeatureService, refs: Sequence[str]) -> FeaturePlan:
    """The plan for a model trained on ``refs`` (its metadata) against today's definitions."""
    views = {v.name: v for v in service.views}
    requests = {r.name: {f.name: f for f in r.fields} for r in service.request}
    inputs: list[_Input] = []
    used_views: dict[str, FeatureView] = {}
    used_fields: dict[str, Field] = {}
    for ref in refs:
        group, _, name = ref.partition(":")
        if group in views:
            specs = {s.name: s for s in views[group].features()}
            if name not in specs:
                raise ModelIncompatibleError(
                    f"model reads {ref!r}, but view {group!r} no longer defines {name!r}"
                )
            if specs[name].dtype not in _NUMERIC:
                raise ModelIncompatibleError(f"feature {ref!r} is not numeric")
            inputs.append(_Input(ref, views[group], name, empty_value(specs[name].function)))
            used_views[group] = views[group]
        elif group in requests and name in requests[group]:
            request_field = requests[group][name]
            if name in used_fields and used_fields[name] != request_field:
                raise ModelIncompatibleError(f"two request features are named {name!r}")
            inputs.append(_Input(ref, None, name, None))
            used_fields[name] = request_field
        else:
            raise ModelIncompatibleError(
                f"model reads {ref!r}, which service {service.name!r} does not provide"
            )
    clash = set(used_fields) & {v.entity.join_key for v in used_views.values()}
    if clash:
        raise ModelIncompatibleError(f"request features {sorted(clash)} clash with entity keys")
    return FeaturePlan(
        service,
        tuple(inputs),
        tuple(used_views.values()),
        tuple(used_fields.values()),
        {name: empty_values(view) for name, view in used_views.items()},
    )


@dataclass
class JoinedRow:
    """One row's model input and what the answer says about it."""

    values: dict[str, Any]  # ref -> value used (None for null)
    ages_ms: dict[str, int | None]  # view -> now - window end served (None: no row's values)
    as_of_ms: int = 0  # t: the time the contract chose rows for
    window_ends_ms: dict[str, int | None] = field(default_factory=dict)  # view -> end served
    status: dict[str, RowStatus] = field(default_factory=dict)  # view -> the contract's verdict
    missing: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    behind: list[str] = field(default_factory=list)
    # Views served their empty values because the store was not read (slow, down, or the
    # request's deadline came first); degraded_reason says which (serving/deadlines.py).
    degraded: list[str] = field(default_factory=list)
    degraded_reason: str | None = None


class RowLookup(dict[tuple[str, str], OnlineRow | None]):
    """The rows a batch read, by (view, entity key), and the stream's progress per view (the
    views without a published progress are absent: features/contract.py)."""

    def __init__(self, progress: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.progress: Mapping[str, int] = progress or {}


def read_rows(
    reader: FeatureReader,
    needs: Sequence[tuple[FeaturePlan, Mapping[str, Any]]],
    as_of_ms: int | None = None,
) -> RowLookup:
    """Every (view, entity key) the rows need, deduplicated, read in one round trip; with the
    stream's progress of their views, read before the rows (so it never claims more than
    the rows show).

    ``as_of_ms``: the earliest t any of the rows is joined at (the store may then leave out
    previous rows the contract cannot serve at or after it: OnlineStore.read_many)."""
    requests = _requests(needs)
    if not requests:
        return RowLookup()
    progress = reader.read_progress([view for view, _ in requests], PROGRESS_MAX_AGE_MS)
    return _lookup(requests, reader.read_many(requests, as_of_ms=as_of_ms), progress)


async def read_rows_async(
    reader: Any,
    needs: Sequence[tuple[FeaturePlan, Mapping[str, Any]]],
    as_of_ms: int | None = None,
) -> RowLookup:
    """read_rows on the event loop, for a reader whose ``reads_async`` is true (its
    read_progress_async and read_many_async: serving/breaker.py, feature_repo/online.py)."""
    requests = _requests(needs)
    if not requests:
        return RowLookup()
    views = [view for view, _ in requests]
    progress = await reader.read_progress_async(views, PROGRESS_MAX_AGE_MS)
    return _lookup(requests, await reader.read_many_async(requests, as_of_ms=as_of_ms), progress)


def _requests(
    needs: Sequence[tuple[FeaturePlan, Mapping[str, Any]]],
) -> list[tuple[FeatureView, list[str]]]:
    wanted: dict[str, tuple[FeatureView, dict[str, None]]] = {}
    for plan, row in needs:
        for view in plan.views:
            keys = wanted.setdefault(view.name, (view, {}))[1]
            keys[str(row[view.entity.join_key])] = None
    return [(view, list(key_set)) for view, key_set in wanted.values()]


def _lookup(
    requests: Sequence[tuple[FeatureView, Sequence[str]]],
    results: Sequence[Sequence[OnlineRow | None]],
    progress: Mapping[str, int],
) -> RowLookup:
    out = RowLookup(progress)
    for (view, view_keys), rows in zip(requests, results, strict=True):
        for key, online_row in zip(view_keys, rows, strict=True):
            out[(view.name, key)] = online_row
    return out


def _stored(row: OnlineRow | None, empties: Mapping[str, Any]) -> StoredRow | None:
    if row is None:
        return None
    empty = row.empty if row.empty is not None else is_empty_row(empties, row.values)
    return StoredRow(row.window_end_ms, empty)


def choose(
    view: FeatureView,
    t_ms: int,
    newest: OnlineRow | None,
    empties: Mapping[str, Any],
    progress_ms: int | None = None,
) -> tuple[OnlineRow | None, RowStatus]:
    """The stored row to serve at t (newest or its previous one) by features.contract."""
    previous = newest.previous if newest is not None else None
    stored_newest, stored_previous = _stored(newest, empties), _stored(previous, empties)
    chosen, status = choose_row(view, t_ms, stored_newest, stored_previous, progress_ms)
    if chosen is None:
        return None, status
    return (newest if chosen is stored_newest else previous), status


def join(
    plan: FeaturePlan,
    row: Mapping[str, Any],
    lookup: RowLookup,
    now_ms: int,
    t_ms: int | None = None,
    serve_behind: ServeBehind = "flag",
) -> JoinedRow:
    """The model's inputs for one request row at time t (default: now), in plan order, with
    the window ends served, ages and flags."""
    t = now_ms if t_ms is None else t_ms
    online: dict[str, OnlineRow | None] = {}
    joined = JoinedRow(values={}, ages_ms={}, as_of_ms=t)
    progress = lookup.progress
    for view in plan.views:
        newest = lookup[(view.name, str(row[view.entity.join_key]))]
        found, status = choose(view, t, newest, plan.empties[view.name], progress.get(view.name))
        joined.status[view.name] = status
        if status is RowStatus.BEHIND:
            joined.behind.append(view.name)
            if serve_behind == "empty":
                found = None
        elif status is RowStatus.MISSING:
            joined.missing.append(view.name)
        online[view.name] = found
        if found is None:
            joined.ages_ms[view.name] = joined.window_ends_ms[view.name] = None
            continue
        age = now_ms - found.window_end_ms
        joined.ages_ms[view.name] = age
        joined.window_ends_ms[view.name] = found.window_end_ms
        if age > view.ttl.total_seconds() * 1000:
            joined.stale.append(view.name)
    for item in plan.inputs:
        if item.view is None:
            joined.values[item.ref] = row[item.name]
            continue
        found = online[item.view.name]
        if found is None:
            joined.values[item.ref] = item.default
            continue
        value = found.values.get(item.name)
        if value is None:
            joined.missing.append(item.ref)
        joined.values[item.ref] = value
    return joined


def degraded_join(plan: FeaturePlan, row: Mapping[str, Any], t_ms: int, reason: str) -> JoinedRow:
    """The model's inputs for one row when the online store could not be read: every view's
    empty values (as for an entity without a row), every view listed under ``degraded``."""
    joined = JoinedRow(values={}, ages_ms={}, as_of_ms=t_ms, degraded_reason=reason)
    for view in plan.views:
        joined.ages_ms[view.name] = joined.window_ends_ms[view.name] = None
        joined.degraded.append(view.name)
    for item in plan.inputs:
        joined.values[item.ref] = row[item.name] if item.view is None else item.default
    return joined


def to_vector(plan: FeaturePlan, joined: JoinedRow) -> list[float]:
    return [_number(joined.values[ref]) for ref in plan.refs]


def to_matrix(plan: FeaturePlan, rows: Sequence[JoinedRow]) -> npt.NDArray[np.float64]:
    matrix = np.empty((len(rows), len(plan.inputs)), dtype=np.float64)
    for i, joined in enumerate(rows):
        matrix[i] = to_vector(plan, joined)
    return matrix


def _number(value: Any) -> float:
    if value is None:
        return math.nan
    return float(value)
