"""The definition language: entities, windows, aggregations, feature views, request features
and feature services. Frozen pydantic models; every check raises FeatureDefinitionError naming
the definition and the field.

Semantics (shared by the reference implementation, Spark and Flink):
- A window has a size and a slide and is aligned to the epoch; it covers [end - size, end).
  Tumbling means slide == size. All windows of one view share one slide, so a view has one
  row per (entity, window end): the online value at time t is the row of the newest window
  whose end is <= t, i.e. end = floor(t / slide) * slide (closed windows).
- What each aggregation computes, its type and its value over an empty window are defined once,
  in features/aggregations.py (one object per function). An entity with no row at an end has
  every window empty.
- Filter and derived columns (see expressions.py) apply per event before windowing.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from features.aggregations import AGGREGATIONS
from features.aggregations import AggregationFunction as AggregationFunction  # re-exported
from features.errors import FeatureDefinitionError
from features.expressions import ExpressionError, infer_type, parse
from features.schema import EventSource, FieldType
from features.schema import Field as SchemaField

_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]*$")
MIN_WINDOW = timedelta(minutes=1)
MAX_WINDOW = timedelta(days=30)
_UNITS = (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1))
_FROZEN = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


def duration_name(delta: timedelta) -> str:
    """'5m', '1h', '30d', '90s': the largest unit that divides the duration."""
    seconds = int(delta.total_seconds())
    for unit, size in _UNITS:
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    raise AssertionError("unreachable: seconds divide everything")


def parse_duration(text: str) -> timedelta:
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration like 90s, 5m, 1h or 30d")
    return timedelta(seconds=int(match.group(1)) * dict(_UNITS)[match.group(2)])


class Window(BaseModel):
    model_config = _FROZEN

    size: timedelta
    slide: timedelta

    @classmethod
    def sliding(cls, size: str, every: str) -> Window:
        return cls(size=parse_duration(size), slide=parse_duration(every))

    @classmethod
    def tumbling(cls, size: str) -> Window:
        return cls(size=parse_duration(size), slide=parse_duration(size))

    @property
    def name(self) -> str:
        return duration_name(self.size)

    @property
    def size_ms(self) -> int:
        return int(self.size.total_seconds() * 1000)

    @property
    def slide_ms(self) -> int:
        return int(self.slide.total_seconds() * 1000)

    def check(self, owner: str, name: str) -> None:
        def fail(reason: str) -> FeatureDefinitionError:
            return FeatureDefinitionError(owner, name, f"windows.{self.name}", reason)

        if not MIN_WINDOW <= self.size <= MAX_WINDOW:
            raise fail("window size must be between 1 minute and 30 days")
        if self.size.total_seconds() % 1 or self.slide.total_seconds() % 1:
            raise fail("window size and slide must be whole seconds")
        if not timedelta(seconds=1) <= self.slide <= self.size:
            raise fail("slide must be between 1 second and the window size")
        if self.size.total_seconds() % self.slide.total_seconds():
            raise fail("window size must be a whole multiple of the slide")


_NEEDS_NUMBER = frozenset(f for f, agg in AGGREGATIONS.items() if agg.needs_number)


class Aggregation(BaseModel):
    model_config = _FROZEN

    function: AggregationFunction
    column: str | None = None  # None only for count (it counts events: reads_column is False)
    windows: tuple[Window, ...]

    def feature_name(self, window: Window) -> str:
        column = f"_{self.column}" if self.column else ""
        return f"{self.function.value}{column}_{window.name}"

    def output_type(self, column_type: FieldType | None) -> FieldType:
        return AGGREGATIONS[self.function].output_type(column_type)


class Entity(BaseModel):
    """What features describe; join_key names the key in requests and the online store."""

    model_config = _FROZEN

    name: str
    join_key: str
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> Self:
        for attr in ("name", "join_key"):
            if not _IDENTIFIER.match(getattr(self, attr)):
                raise FeatureDefinitionError("Entity", self.name, attr, "must be lower_snake_case")
        return self


class FeatureSpec(BaseModel):
    """One output feature of a view: its name, type and how it is computed."""

    model_config = _FROZEN

    name: str
    dtype: FieldType
    function: AggregationFunction
    column: str | None
    window: Window


class FeatureView(BaseModel):
    """Windowed aggregations of one source per entity, computed by Spark and Flink alike."""

    model_config = _FROZEN
    kind: Literal["stream", "batch"] = "stream"

    name: str
    entity: Entity
    source: EventSource
    aggregations: tuple[Aggregation, ...]
    # Source column that holds the entity key (default: the entity's join key).
    key_column: str = ""
    filter: str | None = None
    derived: dict[str, str] = Field(default_factory=dict)
    # How long an online value may be served after its window closed (Feast TTL).
    ttl: timedelta = timedelta(days=1)
    # Availability contract (features/contract.py): a window ending at E is servable at
    # E + lateness, online and in training alike. Must exceed the source's allowed_lateness
    # (the watermark delay) plus the stream's processing time, so the row is there on time.
    lateness: timedelta = timedelta(seconds=5)
    online: bool = True
    owner: str = ""
    description: str = ""

    @property
    def engines(self) -> tuple[str, ...]:
        return ("spark", "flink") if self.kind == "stream" else ("spark",)

    @property
    def slide(self) -> timedelta:
        return self.aggregations[0].windows[0].slide

    @property
    def slide_ms(self) -> int:
        return int(self.slide.total_seconds() * 1000)

    @property
    def max_window(self) -> Window:
        return max((w for a in self.aggregations for w in a.windows), key=lambda w: w.size)

    @property
    def windows(self) -> tuple[Window, ...]:
        unique = {w for a in self.aggregations for w in a.windows}
        return tuple(sorted(unique, key=lambda w: w.size))

    def column_types(self) -> dict[str, FieldType]:
        """Source fields plus derived columns, with their types."""
        types = {f.name: f.type for f in self.source.fields}
        for name, text in self.derived.items():
            types[name] = infer_type(parse(text), types)
        return types

    def features(self) -> tuple[FeatureSpec, ...]:
        types = self.column_types()
        return tuple(
            FeatureSpec(
                name=agg.feature_name(window),
                dtype=agg.output_type(types.get(agg.column) if agg.column else None),
                function=agg.function,
                column=agg.column,
                window=window,
            )
            for agg in self.aggregations
            for window in agg.windows
        )

    @model_validator(mode="after")
    def _check(self) -> Self:
        owner = "BatchFeatureView" if self.kind == "batch" else "FeatureView"

        def fail(field: str, reason: str) -> FeatureDefinitionError:
            return FeatureDefinitionError(owner, self.name, field, reason)

        if not _IDENTIFIER.match(self.name):
            raise fail("name", "must be lower_snake_case, starting with a letter")
        if not self.key_column:
            object.__setattr__(self, "key_column", self.entity.join_key)
        types = {f.name: f.type for f in self.source.fields}
        key_type = types.get(self.key_column)
        if key_type is None:
            raise fail("key_column", f"{self.key_column!r} is not a field of {self.source.name}")
        if key_type is not FieldType.STRING:
            raise fail("key_column", "the entity key column must be a string")
        for name, text in self.derived.items():
            if not _IDENTIFIER.match(name):
                raise fail(f"derived.{name}", "must be lower_snake_case")
            if name in types:
                raise fail(f"derived.{name}", "shadows a source field")
            try:
                types[name] = infer_type(parse(text), types)
            except ExpressionError as exc:
                raise fail(f"derived.{name}", str(exc)) from None
        if self.filter is not None:
            try:
                if infer_type(parse(self.filter), types) is not FieldType.BOOL:
                    raise fail("filter", "must be a boolean expression")
            except ExpressionError as exc:
                raise fail("filter", str(exc)) from None
        if not self.aggregations:
            raise fail("aggregations", "at least one aggregation is required")
        names: set[str] = set()
        slides = set()
        for index, agg in enumerate(self.aggregations):
            where = f"aggregations[{index}]"
            if not agg.windows:
                raise fail(f"{where}.windows", "at least one window is required")
            if agg.column is None and AGGREGATIONS[agg.function].reads_column:
                raise fail(f"{where}.column", f"{agg.function} needs a column")
            if agg.column is not None:
                if agg.column not in types:
                    raise fail(f"{where}.column", f"unknown column {agg.column!r}")
                numeric = types[agg.column] in (FieldType.INT, FieldType.FLOAT)
                if agg.function in _NEEDS_NUMBER and not numeric:
                    raise fail(f"{where}.column", f"{agg.function} needs a numeric column")
            for window in agg.windows:
                window.check(owner, self.name)
                slides.add(window.slide)
                feature = agg.feature_name(window)
                if feature in names:
                    raise fail(f"{where}", f"feature {feature!r} is defined twice")
                names.add(feature)
        if len(slides) > 1:
            # One online row per window end needs one slide; use two views for two slides.
            raise fail("aggregations", "all windows of a view must share one slide")
        if self.ttl < self.slide:
            raise fail("ttl", "must be at least the slide, or values expire before the next")
        if self.lateness.total_seconds() % 1 or self.lateness < timedelta(seconds=1):
            raise fail("lateness", "must be whole seconds, at least 1 s")
        if self.lateness > self.ttl:
            raise fail("lateness", "must not exceed the ttl, or no window is ever servable fresh")
        if self.kind == "stream" and self.lateness <= self.source.allowed_lateness:
            raise fail(
                "lateness",
                f"must exceed the allowed_lateness of source {self.source.name!r} "
                f"({self.source.allowed_lateness}): the stream closes a window only once events "
                "that late have been waited for",
            )
        if self.kind == "stream" and self.lateness - self.source.allowed_lateness > self.slide:
            # The stream may then write two rows that are not servable yet, and the online store
            # keeps only the newest and the one before it (features/contract.py).
            raise fail(
                "lateness",
                "must not exceed the source's allowed_lateness by more than the slide",
            )
        return self


class BatchFeatureView(FeatureView):
    """Computed only from history by Spark (e.g. 30-day means refreshed daily)."""

    kind: Literal["stream", "batch"] = "batch"


class RequestFeatures(BaseModel):
    """Values the caller supplies at prediction time (and training rows carry)."""

    model_config = _FROZEN

    name: str
    fields: tuple[SchemaField, ...]
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not _IDENTIFIER.match(self.name):
            raise FeatureDefinitionError("RequestFeatures", self.name, "name", "lower_snake_case")
        if not self.fields:
            raise FeatureDefinitionError("RequestFeatures", self.name, "fields", "none declared")
        return self


class FeatureService(BaseModel):
    """What one model reads: features of views, and request features, in a fixed order."""

    model_config = _FROZEN

    name: str
    views: tuple[FeatureView, ...]
    request: tuple[RequestFeatures, ...] = ()
    description: str = ""

    @property
    def entities(self) -> tuple[Entity, ...]:
        return tuple({v.entity.name: v.entity for v in self.views}.values())

    def feature_refs(self) -> tuple[str, ...]:
        """'view:feature' for view features, then 'request:field' for request features."""
        refs = [f"{v.name}:{f.name}" for v in self.views for f in v.features()]
        refs += [f"{r.name}:{f.name}" for r in self.request for f in r.fields]
        return tuple(refs)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not _IDENTIFIER.match(self.name):
            raise FeatureDefinitionError("FeatureService", self.name, "name", "lower_snake_case")
        if not self.views and not self.request:
            raise FeatureDefinitionError("FeatureService", self.name, "views", "reads nothing")
        seen = [v.name for v in self.views] + [r.name for r in self.request]
        for name in seen:
            if seen.count(name) > 1:
                raise FeatureDefinitionError(
                    "FeatureService", self.name, "views", f"{name!r} appears twice"
                )
        return self


def empty_value(function: AggregationFunction) -> Any:
    """The value of an aggregation over an empty window (the rule: features/aggregations.py)."""
    return AGGREGATIONS[function].empty
