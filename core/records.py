"""Typed, versioned records of everything Sluice writes to a topic, each defined once.

record            topic                       written by                    read by
FeatureRow        features.<view>             streaming/sinks.py            demo, tests, bench
PredictionRecord  settings.prediction_topic   serving/app.py                demo, tests
FeedbackRecord    settings.feedback_topic     serving/app.py                demo, tests
DeadLetter        settings.dead_letter_topic  events/ingest.py, sinks.py    replay tools, tests
StreamStats       sluice.stream-stats         streaming/sinks.py            streaming/monitor.py
                  (defined in core/stream_stats.py)
heartbeat         events.<source>             events/ingest.py              the stream (skips it)

Writers build a record and call ``encode()`` (orjson bytes); readers call ``decode(bytes)``,
which checks every field and raises ``core.errors.RecordError`` naming the field and the
reason. A dead letter's value is the original bytes of the event, so its record is its
header set: ``DeadLetter.to_headers()`` / ``DeadLetter.from_headers()``.

Versions: every record carries ``"v"`` (a dead letter the header ``sluice.v``). A reader takes
versions up to its own and refuses newer ones by name. Records written before versions existed
carry none and read as version 1, which has the same fields. Bump a record's VERSION when a
reader of the old version would misread the new one (a renamed field, a changed meaning); an
added optional field does not need one.

Write paths validate nothing: records are dataclasses with slots (not frozen: a frozen
dataclass's __init__ costs three times as much), encoded by orjson from a dict literal. The
stream writes a feature row per entity and window, so ``FeatureRow.encode_row`` encodes one
without building the object first (the same layout as ``encode()``).

Heartbeats: ``events.<source>`` carries, besides events, heartbeat records that ingest writes to
a partition that had no record for ``settings.ingest_heartbeat_ms``: no key, an empty value, the
header ``sluice.kind: heartbeat`` (``HEARTBEAT_HEADERS``) and a Kafka timestamp that moves event
time on with the wall clock, so the stream's per-partition watermark advances while the
partition is quiet. They are not events: every reader of an events topic recognizes them with
``is_heartbeat(headers)`` and skips them (the stream counts them apart from events read).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from core.errors import RecordError
from core.record_fields import Fields, check_version, json_type

Headers = list[tuple[str, str | bytes | None]]

# Dead-letter headers. Dashboards and replay tools key on these names.
H_REASON = "sluice.reason"
H_FIELD = "sluice.field"
H_ERROR = "sluice.error"
H_SOURCE = "sluice.source"
H_TOPIC = "sluice.source_topic"
H_PARTITION = "sluice.source_partition"
H_OFFSET = "sluice.source_offset"
H_VIEW = "sluice.view"  # the stream's "late" dead letters: lateness depends on the view
H_VERSION = "sluice.v"
# What a record on an events topic is when it is not an event (absent on events).
H_KIND = "sluice.kind"
KIND_HEARTBEAT = "heartbeat"
HEARTBEAT_HEADERS: Headers = [(H_KIND, KIND_HEARTBEAT.encode())]
HEARTBEAT_VALUE = b""


def is_heartbeat(
    headers: Iterable[tuple[str, str | bytes | None]] | Mapping[str, Any] | None,
) -> bool:
    """Whether a record with these headers (as librdkafka hands them back, a list of pairs or
    a dict; values bytes or str) is a heartbeat, not an event. Events carry no headers, so
    this costs nothing for them."""
    if not headers:
        return False
    items = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in items:
        if name == H_KIND:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            return text == KIND_HEARTBEAT
    return False


# --- features.<view> ------------------------------------------------------------------------


@dataclass(slots=True)
class FeatureRow:
    """The features of one entity for the window ending at window_end_ms, as the stream emits
    it to ``features.<view>`` (keyed by entity, timestamped with the window end)."""

    KIND: ClassVar[str] = "feature row"
    VERSION: ClassVar[int] = 1

    view: str
    entity_key: str
    window_end_ms: int
    values: dict[str, Any]  # feature name -> JSON scalar (null for an empty window's mean, ...)
    emitted_at_ms: int  # wall clock when the row left the window operator: freshness
    v: int = VERSION

    def encode(self) -> bytes:
        return self.encode_row(
            self.view, self.entity_key, self.window_end_ms, self.values, self.emitted_at_ms
        )

    @staticmethod
    def encode_row(
        view: str,
        entity_key: str,
        window_end_ms: int,
        values: Mapping[str, Any],
        emitted_at_ms: int,
    ) -> bytes:
        """encode() of the row these fields make, without building it (the stream's hot path)."""
        return orjson.dumps(
            {
                "v": FeatureRow.VERSION,
                "view": view,
                "entity_key": entity_key,
                "window_end_ms": window_end_ms,
                "values": values,
                "emitted_at_ms": emitted_at_ms,
            }
        )

    @classmethod
    def decode(cls, data: bytes | None) -> FeatureRow:
        f = Fields(cls.KIND, data, cls.VERSION)
        return cls(
            view=f.text("view"),
            entity_key=f.text("entity_key"),
            window_end_ms=f.integer("window_end_ms"),
            values=f.scalars("values"),
            emitted_at_ms=f.integer("emitted_at_ms"),
            v=f.version,
        )


# --- the prediction log and feedback --------------------------------------------------------


@dataclass(slots=True)
class PredictionRecord:
    """One answered prediction row, keyed by prediction_id on the prediction topic."""

    KIND: ClassVar[str] = "prediction"
    VERSION: ClassVar[int] = 1

    prediction_id: str
    time_ms: int  # when the batch read its features: ages are measured from here
    model: str
    model_version: int
    prediction: float
    latency_ms: float  # the request's, from arrival to answer
    request: dict[str, Any]  # the validated request row: entity keys and request features
    features: dict[str, Any]  # "view:feature" or "request:field" -> value the model got
    feature_ages_ms: dict[str, int | None]  # view -> time_ms - window end (null: no row)
    missing: list[str]  # views without a row, and "view:feature" whose value was null
    stale: list[str]  # views whose row is older than their ttl
    # The availability contract (features/contract.py), optional: records written before it
    # carry none (and encode() leaves a None out). window_ends_ms: view -> the window end of
    # the row served (null: the view's empty values were); row_status: view -> "exact",
    # "behind" or "missing"; as_of_ms: the t rows were chosen for (arrival, or event_time).
    window_ends_ms: dict[str, int | None] | None = None
    row_status: dict[str, str] | None = None
    as_of_ms: int | None = None
    # Views served their empty values without reading the online store (slow, down, or the
    # request's deadline first); None when every view was read, and in older records.
    degraded: list[str] | None = None
    # Exp4 ensembles (serving/ensemble.py), optional: {"predictions": {version: value} of the
    # versions that answered in time, "weights": {version: weight}, "used": [...],
    # "missing": [...], "fallback": bool}; each version's loss is learnt from its prediction.
    ensemble: dict[str, Any] | None = None
    # Shadow traffic (serving/rollout.py), optional: a candidate version's prediction on a
    # mirrored request, never answered; shadow_of is the prediction_id of the answer it shadows.
    shadow_of: str | None = None
    # The probability the selection policy gave the answering version for this row
    # (serving/selection.ModelSlot.pick), for off-policy evaluation of other policies
    # (inverse propensity scoring); None: no choice was made (a named version, a shadow,
    # an Exp4 ensemble) and in older records.
    propensity: float | None = None
    v: int = VERSION

    @property
    def shadow(self) -> bool:
        return self.shadow_of is not None

    def encode(self) -> bytes:
        record: dict[str, Any] = {
            "v": self.VERSION,
            "prediction_id": self.prediction_id,
            "time_ms": self.time_ms,
            "model": self.model,
            "model_version": self.model_version,
            "prediction": self.prediction,
            "latency_ms": self.latency_ms,
            "request": self.request,
            "features": self.features,
            "feature_ages_ms": self.feature_ages_ms,
            "missing": self.missing,
            "stale": self.stale,
        }
        if self.window_ends_ms is not None:
            record["window_ends_ms"] = self.window_ends_ms
        if self.row_status is not None:
            record["row_status"] = self.row_status
        if self.as_of_ms is not None:
            record["as_of_ms"] = self.as_of_ms
        if self.degraded is not None:
            record["degraded"] = self.degraded
        if self.ensemble is not None:
            record["ensemble"] = self.ensemble
        if self.shadow_of is not None:
            record["shadow_of"] = self.shadow_of
        if self.propensity is not None:
            record["propensity"] = self.propensity
        # Numpy scalars may reach request and features from the model's side.
        return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)

    @staticmethod
    def _row_status(f: Fields) -> dict[str, str] | None:
        value = f.obj.get("row_status")
        if value is None:
            return None
        if not isinstance(value, dict):
            f.fail("row_status", f"expected an object, got {json_type(value)}")
        for view, status in value.items():
            if not isinstance(status, str):
                f.fail(f"row_status.{view}", f"expected a string, got {json_type(status)}")
        return value

    @staticmethod
    def _ensemble(f: Fields) -> dict[str, Any] | None:
        value = f.obj.get("ensemble")
        if value is None:
            return None
        if not isinstance(value, dict):
            f.fail("ensemble", f"expected an object, got {json_type(value)}")
        predictions = value.get("predictions")
        if not isinstance(predictions, dict):
            f.fail("ensemble.predictions", f"expected an object, got {json_type(predictions)}")
        for version, number in predictions.items():
            if not version.isdigit():
                f.fail("ensemble.predictions", f"{version[:20]!r} is not a version number")
            if not isinstance(number, int | float) or isinstance(number, bool):
                f.fail(
                    f"ensemble.predictions.{version}",
                    f"expected a number, got {json_type(number)}",
                )
        return value

    @classmethod
    def decode(cls, data: bytes | None) -> PredictionRecord:
        f = Fields(cls.KIND, data, cls.VERSION)
        return cls(
            prediction_id=f.text("prediction_id"),
            time_ms=f.integer("time_ms"),
            model=f.text("model"),
            model_version=f.integer("model_version"),
            prediction=f.number("prediction"),
            latency_ms=f.number("latency_ms"),
            request=f.scalars("request"),
            features=f.scalars("features"),
            feature_ages_ms=f.opt_integers("feature_ages_ms"),
            missing=f.strings("missing"),
            stale=f.strings("stale"),
            window_ends_ms=(
                None if f.obj.get("window_ends_ms") is None else f.opt_integers("window_ends_ms")
            ),
            row_status=cls._row_status(f),
            as_of_ms=f.opt_integer("as_of_ms"),
            degraded=None if f.obj.get("degraded") is None else f.strings("degraded"),
            ensemble=cls._ensemble(f),
            shadow_of=f.opt_text("shadow_of"),
            propensity=f.opt_number("propensity"),
            v=f.version,
        )


@dataclass(slots=True)
class FeedbackRecord:
    """The observed label of a prediction, keyed by prediction_id on the feedback topic.

    model, model_version and prediction are set when the server still knew the prediction;
    they are left out of the JSON otherwise.
    """

    KIND: ClassVar[str] = "feedback"
    VERSION: ClassVar[int] = 1

    prediction_id: str
    label: float
    time_ms: int
    model: str | None = None
    model_version: int | None = None
    prediction: float | None = None
    v: int = VERSION

    @property
    def matched(self) -> bool:
        return self.prediction is not None

    def encode(self) -> bytes:
        record: dict[str, Any] = {
            "v": self.VERSION,
            "prediction_id": self.prediction_id,
            "label": self.label,
            "time_ms": self.time_ms,
        }
        if self.prediction is not None:
            record |= {
                "model": self.model,
                "model_version": self.model_version,
                "prediction": self.prediction,
            }
        return orjson.dumps(record)

    @classmethod
    def decode(cls, data: bytes | None) -> FeedbackRecord:
        f = Fields(cls.KIND, data, cls.VERSION)
        return cls(
            prediction_id=f.text("prediction_id"),
            label=f.number("label"),
            time_ms=f.integer("time_ms"),
            model=f.opt_text("model"),
            model_version=f.opt_integer("model_version"),
            prediction=f.opt_number("prediction"),
            v=f.version,
        )


# --- dead letters ---------------------------------------------------------------------------


@dataclass(slots=True)
class DeadLetter:
    """Why an event went to the dead-letter topic. The record's value is the event's original
    bytes and its key the original key; this is its header set."""

    KIND: ClassVar[str] = "dead letter"
    VERSION: ClassVar[int] = 1

    reason: str  # a stable code: invalid_json, ..., out_of_range, late
    field: str | None  # the event field at fault, when one is
    error: str  # the reason in words, naming the field
    source: str  # the event source's name
    source_topic: str  # where the event was read
    partition: int
    offset: int
    view: str | None = None  # set by the stream for "late": lateness depends on the view
    v: int = VERSION

    def to_headers(self) -> Headers:
        headers: Headers = [
            (H_REASON, self.reason.encode()),
            (H_FIELD, (self.field or "").encode()),
            (H_ERROR, self.error.encode()),
            (H_SOURCE, self.source.encode()),
            (H_TOPIC, self.source_topic.encode()),
            (H_PARTITION, str(self.partition).encode()),
            (H_OFFSET, str(self.offset).encode()),
        ]
        if self.view is not None:
            headers.append((H_VIEW, self.view.encode()))
        headers.append((H_VERSION, str(self.VERSION).encode()))
        return headers

    @classmethod
    def from_headers(
        cls, headers: Iterable[tuple[str, str | bytes | None]] | Mapping[str, Any] | None
    ) -> DeadLetter:
        """The dead letter of a record's headers (as librdkafka hands them back, or a dict)."""
        items = headers.items() if isinstance(headers, Mapping) else headers or ()
        text: dict[str, str] = {}
        for name, value in items:
            try:
                text[name] = value.decode() if isinstance(value, bytes) else (value or "")
            except UnicodeDecodeError:
                raise RecordError(cls.KIND, name, "header is not UTF-8") from None

        def get(name: str) -> str:
            if name not in text:
                raise RecordError(cls.KIND, name, "missing header")
            return text[name]

        def integer(name: str) -> int:
            value = get(name)
            try:
                return int(value)
            except ValueError:
                raise RecordError(cls.KIND, name, f"expected an integer, got {value!r}") from None

        raw_version = text.get(H_VERSION, "1")  # none before versions existed: version 1
        version: Any = int(raw_version) if raw_version.isdigit() else raw_version
        return cls(
            reason=get(H_REASON),
            field=get(H_FIELD) or None,
            error=get(H_ERROR),
            source=get(H_SOURCE),
            source_topic=get(H_TOPIC),
            partition=integer(H_PARTITION),
            offset=integer(H_OFFSET),
            view=text.get(H_VIEW) or None,
            v=check_version(cls.KIND, H_VERSION, version, cls.VERSION),
        )
