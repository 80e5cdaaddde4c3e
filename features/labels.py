"""Training labels in the definition language: where `sluice train` finds what a model learns.

A ``Labels`` declaration names one event source whose history holds one label row per event,
and says how to turn that row into a training row::

    Labels(
        name="delivery_times",
        source=DELIVERIES,                   # the history of this source holds the labels
        label="delivery_seconds",            # the column to predict (int, float or bool)
        time_field="placed_at",              # when features must be known (default: event time)
        entities={"restaurant": "restaurant_id", "zone": "zone_id"},   # entity -> column
        request={"distance_km": "distance_km", "hour_of_day": "hour(placed_at)",
                 "items": "items"},          # request feature -> column or expression
        joins=[LabelJoin(source=ORDERS, on="order_id", columns=["items"])],
        services=["delivery_eta", "delivery_eta_batch_only"],
    )

Semantics (batch/train.py builds the rows):
- One label row per event of ``source`` in the history. ``time_field`` becomes the row's
  ``event_timestamp``: a point-in-time training set gives it the features served at that time
  (batch/training.py), so pick the time the prediction is made (an order's placement), not
  the time the label arrived (its delivery).
- ``joins`` add columns of another source's history matched on ``on`` (a column both sources
  declare): an inner join, so label rows without a match are left out and counted; when the
  other source holds several events with one ``on`` value, the first in history order is used.
  Joined columns may be used like the source's own columns below.
- ``entities`` maps entity names to the column holding their key (a non-nullable string); the
  training row carries it under the entity's join key, as requests do.
- ``request`` maps each request-feature field that the services read to a column or an
  expression (features/expressions.py, e.g. ``hour(placed_at)``, the UTC hour); timestamps are
  epoch milliseconds in expressions. Expressions may not read the label.
- ``services`` names the feature services trained on these labels; a service is trained on at
  most one declaration.

Every check that one declaration can make alone runs when it is built (columns exist, types,
expressions parse and type-check); ``check_labels`` runs at registry load (features/registry.py)
for what needs the other definitions: entities and services exist, each service's entities and
request features are all supplied, with compatible types. Errors are FeatureDefinitionError
naming the declaration and the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from features.definitions import Entity, FeatureService
from features.errors import FeatureDefinitionError
from features.expressions import (
    Binary,
    Call,
    Column,
    Expr,
    ExpressionError,
    Unary,
    infer_type,
    parse,
)
from features.schema import EventSource, FieldType

_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]*$")
_FROZEN = ConfigDict(frozen=True, extra="forbid")
_NUMERIC = (FieldType.INT, FieldType.FLOAT, FieldType.BOOL)
# The label rows' time column, as batch.training and models.fit expect it.
EVENT_TIMESTAMP = "event_timestamp"


class LabelJoin(BaseModel):
    """Columns of another source's history, matched on a column both sources declare."""

    model_config = _FROZEN

    source: EventSource
    on: str
    columns: tuple[str, ...]

    @property
    def description(self) -> str:
        return f"{self.source.name} by {self.on}"


class Labels(BaseModel):
    """One label row per event of ``source``: entities, request features, label and time."""

    model_config = _FROZEN

    name: str
    source: EventSource
    label: str
    time_field: str = ""  # default: the source's event time
    entities: dict[str, str]
    request: dict[str, str] = Field(default_factory=dict)
    joins: tuple[LabelJoin, ...] = ()
    services: tuple[str, ...]
    description: str = ""

    def column_types(self) -> dict[str, FieldType]:
        """Columns a label row is built from: the source's fields, then joined columns."""
        types = {f.name: f.type for f in self.source.fields}
        for join in self.joins:
            types.update({c: join.source.field(c).type for c in join.columns})
        return types

    @model_validator(mode="after")
    def _check(self) -> Self:
        def fail(field: str, reason: str) -> FeatureDefinitionError:
            return FeatureDefinitionError("Labels", self.name, field, reason)

        if not _IDENTIFIER.match(self.name):
            raise fail("name", "must be lower_snake_case, starting with a letter")
        fields = {f.name: f for f in self.source.fields}
        label = fields.get(self.label)
        if label is None:
            raise fail("label", f"{self.label!r} is not a field of {self.source.name}")
        if label.type not in _NUMERIC:
            raise fail("label", f"must be an int, float or bool field, not {label.type}")
        if not self.time_field:
            object.__setattr__(self, "time_field", self.source.event_time_field)
        time = fields.get(self.time_field)
        if time is None:
            raise fail("time_field", f"{self.time_field!r} is not a field of {self.source.name}")
        if time.type is not FieldType.TIMESTAMP or time.nullable:
            raise fail("time_field", "must be a non-nullable timestamp field")
        nullable = {f.name: f.nullable for f in self.source.fields}
        types = {f.name: f.type for f in self.source.fields}
        for index, join in enumerate(self.joins):
            self._check_join(fail, f"joins[{index}]", join, types)
            for column in join.columns:
                types[column] = join.source.field(column).type
                nullable[column] = join.source.field(column).nullable
        if not self.entities:
            raise fail("entities", "name at least one entity and the column of its key")
        for entity, column in self.entities.items():
            where = f"entities.{entity}"
            if not _IDENTIFIER.match(entity):
                raise fail(where, "entity names are lower_snake_case")
            if column not in types:
                raise fail(where, f"unknown column {column!r}")
            if types[column] is not FieldType.STRING or nullable[column]:
                raise fail(where, f"{column!r}: entity keys must be non-nullable strings")
        for name, text in self.request.items():
            where = f"request.{name}"
            if not _IDENTIFIER.match(name):
                raise fail(where, "request feature names are lower_snake_case")
            if name in (self.label, EVENT_TIMESTAMP):
                raise fail(where, f"{name!r} is a column of the label rows already")
            try:
                expr = parse(text)
                infer_type(expr, types)
            except ExpressionError as exc:
                raise fail(where, str(exc)) from None
            if self.label in expression_columns(expr):
                raise fail(where, f"reads the label {self.label!r}: it would leak into features")
        if not self.services:
            raise fail("services", "name at least one feature service trained on these labels")
        for service in self.services:
            if self.services.count(service) > 1:
                raise fail("services", f"{service!r} appears twice")
        return self

    def _check_join(
        self,
        fail: Callable[[str, str], FeatureDefinitionError],
        where: str,
        join: LabelJoin,
        types: Mapping[str, FieldType],
    ) -> None:
        other = {f.name: f.type for f in join.source.fields}
        if join.on not in types:
            raise fail(f"{where}.on", f"{join.on!r} is not a column of {self.source.name}")
        if join.on not in other:
            raise fail(f"{where}.on", f"{join.on!r} is not a field of {join.source.name}")
        if types[join.on] is not other[join.on]:
            raise fail(f"{where}.on", f"{join.on!r} has different types in the two sources")
        if not join.columns:
            raise fail(f"{where}.columns", "name at least one column to take")
        for column in join.columns:
            if column not in other:
                raise fail(f"{where}.columns", f"{column!r} is not a field of {join.source.name}")
            if column in types:
                raise fail(f"{where}.columns", f"{column!r} is a column of the label rows already")


def expression_columns(expr: Expr) -> set[str]:
    """The columns an expression reads."""
    if isinstance(expr, Column):
        return {expr.name}
    if isinstance(expr, Call):
        return set().union(*(expression_columns(a) for a in expr.args))
    if isinstance(expr, Unary):
        return expression_columns(expr.operand)
    if isinstance(expr, Binary):
        return expression_columns(expr.left) | expression_columns(expr.right)
    return set()


def check_labels(
    labels: Labels,
    entities: Mapping[str, Entity],
    services: Mapping[str, FeatureService],
) -> None:
    """The checks that need the registry: entities, services and what each service reads."""

    def fail(field: str, reason: str) -> FeatureDefinitionError:
        return FeatureDefinitionError("Labels", labels.name, field, reason)

    outputs = {labels.label: "the label", EVENT_TIMESTAMP: "the label time"}
    outputs.update({name: f"request feature {name!r}" for name in labels.request})
    for name in labels.entities:
        entity = entities.get(name)
        if entity is None:
            raise fail(f"entities.{name}", f"unknown entity (known: {', '.join(sorted(entities))})")
        if entity.join_key in outputs:
            raise fail(
                f"entities.{name}",
                f"join key {entity.join_key!r} clashes with {outputs[entity.join_key]}",
            )
        outputs[entity.join_key] = f"entity {name!r}"
    types = labels.column_types()
    for name in labels.services:
        service = services.get(name)
        if service is None:
            known = ", ".join(sorted(services)) or "none"
            raise fail("services", f"unknown feature service {name!r} (known: {known})")
        for entity in service.entities:
            if entity.name not in labels.entities:
                raise fail(
                    "entities", f"service {name!r} reads entity {entity.name!r}: name its column"
                )
        for request in service.request:
            for spec in request.fields:
                if spec.name not in labels.request:
                    raise fail(
                        "request",
                        f"service {name!r} reads request feature {request.name}:{spec.name}: "
                        "give its column or expression",
                    )
                have = infer_type(parse(labels.request[spec.name]), types)
                if not _fits(have, spec.type):
                    raise fail(
                        f"request.{spec.name}",
                        f"is {have}, but {request.name}:{spec.name} is declared {spec.type}",
                    )


def _fits(have: FieldType, want: FieldType) -> bool:
    return have is want or (have is FieldType.INT and want is FieldType.FLOAT)
