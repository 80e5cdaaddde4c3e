"""Per-event step before windowing: parse, late check, derived columns, filter. Pure Python.

Events on ``events.<source>`` were validated by the ingest path, so parse failures should not
happen; if a producer bypassed ingest they still end in the dead-letter topic with a reason,
never in a crash loop of the job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from events.identity import event_id
from features.expressions import compile_python, parse
from features.validation import Rejection, RejectReason
from streaming.compile import CompiledView


@dataclass(frozen=True, slots=True)
class Prepared:
    """What the window state needs of one event: entity key, event time, aggregated columns."""

    key: str
    t: int
    values: tuple[Any, ...]
    event_id: int  # compact_id of the event's bytes: a repeat of it is counted once


def compact_id(raw: bytes) -> int:
    """The event's id (events.identity.event_id, md5 hex) cut to its first 8 bytes, as an int:
    what a tile keeps per event (a collision needs two events of one key and slide)."""
    return int(event_id(raw)[:16], 16)


class Filtered:
    """The view's filter did not keep the event (it counts as processed, not lost)."""


FILTERED = Filtered()


class EventPreparer:
    """Turns canonical event bytes into Prepared, Rejection (dead letter) or FILTERED."""

    def __init__(self, compiled: CompiledView) -> None:
        self.c = compiled
        self._derived: list[tuple[str, Callable[[Any], Any]]] = [
            (name, compile_python(parse(text))) for name, text in compiled.derived
        ]
        self._keep = compile_python(parse(compiled.filter)) if compiled.filter else None

    def first_end(self, t: int) -> int:
        """End of the smallest window holding t: the end of its slide bucket."""
        slide = self.c.slide_ms
        return t - t % slide + slide

    def prepare(self, raw: bytes, watermark: int) -> Prepared | Rejection | Filtered:
        c = self.c
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return Rejection(RejectReason.INVALID_JSON, None, f"not JSON: {exc}")
        if not isinstance(event, dict):
            return Rejection(RejectReason.NOT_AN_OBJECT, None, "event is not a JSON object")
        t = event.get(c.time_field)
        if t is None:
            return Rejection(RejectReason.MISSING_FIELD, c.time_field, "event time is missing")
        if not isinstance(t, int) or isinstance(t, bool):
            return Rejection(RejectReason.WRONG_TYPE, c.time_field, "expected epoch milliseconds")
        key = event.get(c.key_column)
        if not isinstance(key, str):
            reason = RejectReason.NULL_FIELD if key is None else RejectReason.WRONG_TYPE
            return Rejection(reason, c.key_column, "the entity key must be a string")
        for name, derive in self._derived:
            event[name] = derive(event)
        if self._keep is not None and self._keep(event) is not True:
            return FILTERED
        # After the filter: an event the view would not count cannot make its rows wrong.
        end = self.first_end(t)
        if end <= watermark:
            return Rejection(
                RejectReason.LATE,
                c.time_field,
                f"event time {t} is too late for view {c.name!r}: the watermark {watermark} "
                f"(newest event time - {c.allowed_lateness_ms} ms allowed lateness) has passed "
                f"the end {end} of its smallest window, whose row was already emitted",
            )
        values = tuple(event.get(column) for column in c.columns)
        return Prepared(key, t, values, compact_id(raw))
