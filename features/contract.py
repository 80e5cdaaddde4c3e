"""The availability contract: which window's value is *the* value of a feature at time t.

A window ending at E becomes servable at ``E + view.lateness``. The value of a windowed feature
at time t, online and in training alike, is the row of the newest window whose servable time is
<= t:

    E(t) = floor((t - lateness) / slide) * slide

Example timeline, a 5-minute count sliding every minute, lateness 5 s, source allowed_lateness
(watermark delay) 2 s:

    12:00:00.000  window [11:55, 12:00) ends
    12:00:02.xxx  the watermark passes 12:00 (events up to 2 s out of order were waited for);
                  the stream writes the row for E = 12:00 (typically well under a second later)
    12:00:05.000  E = 12:00 becomes servable: requests at t >= 12:00:05 get it; a request at
                  12:00:04.999 still gets E = 11:59, and so does a training label at that time

Both engines write one row per (entity, window end) where a window holds events, plus a closing
row of empty values right after each run of them, so the value at E is: the row at E; or, when
the entity has no row at E, the empty values if its newest row before E is a closing row or it
has none. The online store keeps the newest row and the one before it, because the stream may
write E + slide (closed early, not servable yet) before a request that still needs E.

The stream's progress. A missing row and a closing row older than E(t) are exact only if the
stream has finished E(t): otherwise an event of E(t) may be in flight, and the first row of an
entity, or the row after a closing row, is simply not written yet. The stream therefore
publishes, per view, the window end up to which every row is written (``progress_ms``: the
streaming job's settled watermark, the minimum over its subtasks; streaming/sinks.py). Below
E(t), such rows are ``behind``. A view without a published progress (no stream has run, batch
materialization only) is judged by its rows alone, as before the marker existed.

Everything that decides "which window at t" goes through this module: the reference, Spark
training sets, the offline store's servable timestamp (Feast's point-in-time reads), and the
predictor, which flags rows older than E(t) (the stream is behind) and counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from features.definitions import FeatureView


def lateness_ms(view: FeatureView) -> int:
    return int(view.lateness.total_seconds() * 1000)


def servable_at_ms(view: FeatureView, window_end_ms: int) -> int:
    """When the row of the window ending at ``window_end_ms`` may be served."""
    return window_end_ms + lateness_ms(view)


def window_end_at(view: FeatureView, t_ms: int) -> int:
    """The end of the newest window whose servable time is <= t: the one to serve at t."""
    slide = view.slide_ms
    return ((t_ms - lateness_ms(view)) // slide) * slide


class RowStatus(StrEnum):
    """How a stored row relates to the window the contract asks for at t."""

    EXACT = "exact"  # the row of E(t), or an empty value that is exactly E(t)'s value
    BEHIND = "behind"  # older than E(t) and not provably equal to it: the stream is late
    MISSING = "missing"  # the entity has no row (never seen; the stream is past E(t) if known)


@dataclass(frozen=True, slots=True)
class StoredRow:
    """What the choice needs of a stored row: its window end and whether all windows are empty."""

    window_end_ms: int
    empty: bool


def choose_row(
    view: FeatureView,
    t_ms: int,
    newest: StoredRow | None,
    previous: StoredRow | None,
    progress_ms: int | None = None,
) -> tuple[StoredRow | None, RowStatus]:
    """The stored row to serve at t among the newest and the previous one, and its status.

    - newest end == E(t): serve it (EXACT).
    - newest end > E(t) (written early, not servable yet): serve the previous row when its end
      is E(t), or when it is older but a closing row (empty values: the windows emptied and no
      event came since, so E(t) is empty too); otherwise the previous row is behind.
    - newest end < E(t): EXACT only when it is a closing row (nothing happened since); a
      non-empty row is always followed by a row at its end + slide, so its absence means the
      stream has not written E(t) yet (BEHIND).
    - ``progress_ms`` (the stream's progress, None when unknown) below E(t): only a row whose
      end is E(t) is EXACT; a missing row or an older closing row is BEHIND (E(t)'s row may
      not be written yet), served as it is.
    The choice never serves a row whose servable time is after t.
    """
    target = window_end_at(view, t_ms)
    unfinished = progress_ms is not None and progress_ms < target
    if newest is None:
        return None, RowStatus.BEHIND if unfinished else RowStatus.MISSING
    candidate: StoredRow | None = newest
    if newest.window_end_ms > target:
        candidate = previous
        if candidate is None or candidate.window_end_ms > target:
            # No servable row is kept: the entity's first row ever is not servable yet. Its
            # value at t is therefore the empty one, exactly (nothing before it).
            return None, RowStatus.BEHIND if unfinished else RowStatus.MISSING
    assert candidate is not None
    if candidate.window_end_ms == target or (candidate.empty and not unfinished):
        return candidate, RowStatus.EXACT
    return candidate, RowStatus.BEHIND
