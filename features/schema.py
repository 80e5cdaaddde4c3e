"""Event sources: the declared shape of the events that producers publish.

An EventSource names its fields and their types, which field carries the event time and which
field is the partitioning key. Producers publish raw JSON to ``raw_topic``; the validating ingest
path forwards canonical events to ``topic`` (keyed by ``key_field``, Kafka timestamp = event
time) and everything else to the dead-letter topic with a reason.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Self

from pydantic import BaseModel, ConfigDict, model_validator

from features.errors import FeatureDefinitionError

_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]*$")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class FieldType(StrEnum):
    """JSON value types an event field may declare."""

    STRING = "string"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    # Epoch milliseconds (JSON integer) or an ISO-8601 string with a timezone.
    TIMESTAMP = "timestamp"


class Field(BaseModel):
    """One field of an event. ``minimum``/``maximum`` bound numeric fields (inclusive)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    type: FieldType
    nullable: bool = False
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""


class EventSource(BaseModel):
    """A stream of events with a schema, a key and an event time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    fields: tuple[Field, ...]
    key_field: str
    event_time_field: str
    topic: str = ""
    raw_topic: str = ""
    # How far behind the newest event time of its partition an event may arrive and still
    # count (the stream's watermark delay); later ones are dead-lettered as "late". Small, so
    # that windows close early: a view's `lateness` (when its windows become servable) must
    # exceed it.
    allowed_lateness: timedelta = timedelta(seconds=2)
    # Event times outside [earliest_event_time, now + max_clock_skew] are rejected as out of range.
    earliest_event_time: datetime = datetime(2000, 1, 1, tzinfo=UTC)
    max_clock_skew: timedelta = timedelta(minutes=5)
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> Self:
        def fail(field: str, reason: str) -> FeatureDefinitionError:
            return FeatureDefinitionError("EventSource", self.name, field, reason)

        if not _IDENTIFIER.match(self.name):
            raise fail("name", "must be lower_snake_case, starting with a letter")
        if not self.fields:
            raise fail("fields", "at least one field is required")
        seen: set[str] = set()
        for f in self.fields:
            if not _IDENTIFIER.match(f.name):
                raise fail(f"fields.{f.name}", "field names must be lower_snake_case")
            if f.name in seen:
                raise fail(f"fields.{f.name}", "declared twice")
            seen.add(f.name)
            numeric = f.type in (FieldType.INT, FieldType.FLOAT)
            if (f.minimum is not None or f.maximum is not None) and not numeric:
                raise fail(f"fields.{f.name}", "minimum/maximum apply to int and float only")
            if f.minimum is not None and f.maximum is not None and f.minimum > f.maximum:
                raise fail(f"fields.{f.name}", "minimum is greater than maximum")
        by_name = {f.name: f for f in self.fields}
        key = by_name.get(self.key_field)
        if key is None:
            raise fail("key_field", f"{self.key_field!r} is not a declared field")
        if key.type is not FieldType.STRING or key.nullable:
            raise fail("key_field", "the key must be a non-nullable string field")
        ts = by_name.get(self.event_time_field)
        if ts is None:
            raise fail("event_time_field", f"{self.event_time_field!r} is not a declared field")
        if ts.type is not FieldType.TIMESTAMP or ts.nullable:
            raise fail("event_time_field", "the event time must be a non-nullable timestamp")
        for attr in ("topic", "raw_topic"):
            value = getattr(self, attr)
            if value and not _TOPIC.match(value):
                raise fail(attr, f"{value!r} is not a valid Kafka topic name")
        if self.allowed_lateness < timedelta(0):
            raise fail("allowed_lateness", "must not be negative")
        if self.earliest_event_time.tzinfo is None:
            raise fail("earliest_event_time", "must carry a timezone")
        # Default topic names follow the source name, so most definitions need not spell them.
        if not self.topic:
            object.__setattr__(self, "topic", f"events.{self.name}")
        if not self.raw_topic:
            object.__setattr__(self, "raw_topic", f"raw.{self.name}")
        if self.topic == self.raw_topic:
            raise fail("raw_topic", "must differ from topic")
        return self

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)
