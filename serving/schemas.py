"""Request and response bodies, and the per-model row validation built from the definitions.

A row is flat: the entity join keys the model's views need, plus its request features, e.g.
{"restaurant_id": "r00012", "zone_id": "z03", "distance_km": 2.4, "hour_of_day": 12,
"items": 3}. Request features are validated with the type and the minimum/maximum their
definition declares (strict: no strings for numbers, no NaN); unknown fields are refused, so a
typo is a 422 naming the field rather than a silent default. An optional ``event_time`` (epoch
milliseconds or ISO-8601 with a timezone) replays a row at that time: the availability contract
picks the rows servable then instead of at the request's arrival (serving/features.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from features.schema import FieldType
from serving.errors import InvalidRequestError, ModelIncompatibleError
from serving.features import FeaturePlan

EVENT_TIME = "event_time"  # the row field that replays a row at a time of the caller's
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
MIN_EVENT_TIME_MS = 946_684_800_000  # 2000-01-01, as for events (features/validation.py)
# 2100-01-01 (exclusive). The bound was "now + 5 minutes", as for events, but a bound that moves
# with the clock cannot be written in the OpenAPI document: schemathesis sent times the
# document allowed and the server refused. A fixed range still catches the unit mistakes
# (seconds are before 2000, microseconds after 2100); a time in the future replays the rows
# the store holds now.
MAX_EVENT_TIME_MS = 4_102_444_800_000
# The ISO-8601 form in the document: years 2001-2098, so that any UTC offset stays in range.
EVENT_TIME_PATTERN = (
    r"^20(0[1-9]|[1-8][0-9]|9[0-8])-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)
EVENT_TIME_DOC = (
    "Optional, for replays: the time to serve this row at, as epoch milliseconds or an "
    "ISO-8601 string with a timezone (from 2000-01-01 to 2100-01-01, exclusive). "
    "Default: the server's clock when the request arrives. Online feature rows are chosen by "
    "the availability contract at this time (a window ending at E is served from E + the "
    "view's lateness); the store keeps each entity's newest row and the one before it, so "
    "only recent times replay exactly."
)
_PY_TYPES: dict[FieldType, type] = {
    FieldType.INT: int,
    FieldType.FLOAT: float,
    FieldType.BOOL: bool,
}


class PredictRequest(BaseModel):
    """/predict's body as parsed; its documented schema is serving.openapi's."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Model name; default: the first served model.")
    rows: list[dict[str, Any]] = Field(
        min_length=1,
        description="Entity keys and request features, one object per prediction; "
        f"optionally '{EVENT_TIME}' (replays). At most max_request_rows (a setting, default "
        "1000) per request.",
    )
    return_features: bool = Field(
        False, strict=True, description="Also answer with the feature values used."
    )
    deadline_ms: int | None = Field(
        None,
        ge=1,
        le=3_600_000,
        description="Answer within this many milliseconds (also the header "
        "X-Request-Timeout-Ms; the smaller wins). Default and maximum are server settings "
        "(request_deadline_ms, request_deadline_max_ms: a larger value is capped). Rows whose "
        "features are not read in time are answered from the views' empty values and listed "
        "under `degraded`, or the request is a 504 when the server rejects instead.",
    )


# /predict's request body in the OpenAPI document: serving.openapi replaces the schema with
# one alternative per served model (its rows' required fields and types from its plan).
PREDICT_BODY: dict[str, Any] = {
    "required": True,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}},
}


def parse_predict(raw: bytes) -> PredictRequest:
    """A /predict body (JSON parsed and checked in one pass by pydantic-core)."""
    try:
        return PredictRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidRequestError(problems_of(exc.errors())) from None


class Problem(BaseModel):
    field: str = Field(description="Where: 'body', 'rows[0].distance_km', ...")
    reason: str
    input: Any = Field(None, description="The value refused, when there was one.")


class InvalidRequestBody(BaseModel):
    """422: every bad field of the request named, with the reason."""

    error: str = Field(description="'invalid_request'")
    detail: list[Problem]


class ErrorBody(BaseModel):
    """Every other error: a machine-readable code and a sentence saying what to do."""

    model_config = ConfigDict(extra="allow")  # e.g. features_behind adds views and rows

    error: str = Field(description="e.g. model_not_found, overloaded, features_behind")
    detail: str


class RowPrediction(BaseModel):
    prediction_id: str
    prediction: float
    model: str
    model_version: int
    feature_ages_ms: dict[str, int | None] = Field(
        description="Per view: now minus the window end of the online row used (null: no row)."
    )
    window_ends_ms: dict[str, int | None] = Field(
        description="Per view: the window end (epoch ms) of the online row served (null: the "
        "view's empty values were served). The availability contract serves, at t (arrival or "
        "event_time), the newest window whose end + the view's lateness is <= t."
    )
    missing: list[str] = Field(
        description="Views with no servable online row (their documented defaults were used) "
        "and 'view:feature' values that were null (NaN to the model)."
    )
    stale: list[str] = Field(description="Views whose row is older than the view's ttl.")
    behind: list[str] = Field(
        description="Views whose newest servable row is older than the window the contract "
        "asks for at t (the stream is late); served as the serve_behind setting says."
    )
    degraded: list[str] = Field(
        default_factory=list,
        description="Views served their empty values without reading the online store, "
        "because it was slow or down or the request's deadline came first (as `missing`, "
        "but no row was looked for).",
    )
    features: dict[str, Any] | None = None


class PredictResponse(BaseModel):
    predictions: list[RowPrediction]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prediction_id: str = Field(min_length=1, max_length=64)
    label: float = Field(strict=True, allow_inf_nan=False, description="The observed outcome.")


class FeedbackResponse(BaseModel):
    prediction_id: str
    matched: bool = Field(description="Whether this server made the prediction (recently).")
    error: float | None = None


class PromoteResponse(BaseModel):
    model: str
    version: int
    previous_version: int | None
    served: bool


def _integral(value: Any) -> Any:
    """JSON Schema's integer: 46.0 is one (a client's JSON encoder may write it so), 46.5 not;
    anything else is left to the strict check."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def event_time_ms(value: Any) -> int | None:
    """An event_time (epoch ms, or ISO-8601 with a timezone) as epoch ms, within range."""
    if value is None:
        return None
    value = _integral(value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("expected epoch milliseconds or an ISO-8601 string with a timezone")
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{value[:40]!r} is not an ISO-8601 timestamp") from None
        if parsed.tzinfo is None:
            raise ValueError(f"{value[:40]!r} has no timezone (add Z or +hh:mm)")
        value = (parsed - _EPOCH) // _ONE_MS
    assert isinstance(value, int)
    if not MIN_EVENT_TIME_MS <= value < MAX_EVENT_TIME_MS:
        raise ValueError(
            f"{value} is outside [{MIN_EVENT_TIME_MS} (2000-01-01), {MAX_EVENT_TIME_MS} "
            "(2100-01-01))"
        )
    return value


EventTime = Annotated[int | None, BeforeValidator(event_time_ms)]


def row_model(plan: FeaturePlan, name: str) -> type[BaseModel]:
    """A pydantic model of one row for a plan: entity keys, request features, event_time."""
    fields: dict[str, Any] = {
        key: (str, Field(min_length=1, max_length=256, strict=True)) for key in plan.entity_keys
    }
    for request_field in plan.request_fields:
        python_type: Any = _PY_TYPES[request_field.type]
        if request_field.type is FieldType.INT:
            python_type = Annotated[int, BeforeValidator(_integral)]
        constraints: dict[str, Any] = {"strict": True}
        if request_field.minimum is not None:
            constraints["ge"] = request_field.minimum
        if request_field.maximum is not None:
            constraints["le"] = request_field.maximum
        if request_field.type is FieldType.FLOAT:
            constraints["allow_inf_nan"] = False
        if request_field.nullable:
            python_type = python_type | None
            constraints["default"] = None
        fields[request_field.name] = (
            python_type,
            Field(description=request_field.description, **constraints),
        )
    if EVENT_TIME in fields:
        raise ModelIncompatibleError(
            f"model {name!r}: {EVENT_TIME!r} names an entity key or request feature, but rows "
            "use it for replays; rename it"
        )
    fields[EVENT_TIME] = (EventTime, Field(None, description=EVENT_TIME_DOC))
    model: type[BaseModel] = create_model(
        f"{name}_row", __config__=ConfigDict(extra="forbid"), **fields
    )
    return model


def field_path(loc: Sequence[str | int]) -> str:
    """('body', 'rows', 0, 'distance_km') -> 'rows[0].distance_km'."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def problems_of(errors: Sequence[Any], prefix: Sequence[str | int] = ()) -> list[dict[str, Any]]:
    """Pydantic/FastAPI errors as [{field, reason, input?}]."""
    out = []
    for error in errors:
        if error.get("type") == "json_invalid":  # FastAPI: loc ('body', <character position>)
            detail = (error.get("ctx") or {}).get("error", "")
            where = f" at character {error['loc'][-1]}" if error["loc"] else ""
            out.append({"field": "body", "reason": f"invalid JSON{where}: {detail}"})
            continue
        problem: dict[str, Any] = {
            "field": field_path([*prefix, *error["loc"]]),
            "reason": error["msg"],
        }
        if error.get("type") != "missing" and "input" in error:
            shown = _shown_input(error["input"])
            if shown is not _HIDDEN:
                problem["input"] = shown
        out.append(problem)
    return out


_HIDDEN = object()
_MAX_SHOWN = 100  # characters of a bad string value echoed back
_MAX_INT = 2**63


def _shown_input(value: Any) -> Any:
    """A bad value as the answer may echo it: scalars only (an object or list could be
    megabytes, or nested deeper than the encoder recurses), strings and huge integers cut
    short, and NaN/infinity as text (JSON has no such numbers)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -_MAX_INT < value < _MAX_INT else f"{str(value)[:20]}... (an integer)"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value if len(value) <= _MAX_SHOWN else value[:_MAX_SHOWN] + "..."
    return _HIDDEN


def validate_rows(
    model: type[BaseModel], rows: Sequence[dict[str, Any]], max_rows: int
) -> list[tuple[dict[str, Any], int | None]]:
    """Every row checked; one 422 naming every bad field of every row (or `rows` alone when
    there are more than max_rows). Per row: the entity keys and request features, and its
    event_time in epoch ms (None when not given)."""
    if len(rows) > max_rows:
        reason = f"at most {max_rows} rows per request (setting max_request_rows), got {len(rows)}"
        raise InvalidRequestError([{"field": "rows", "reason": reason}])
    problems: list[dict[str, Any]] = []
    valid: list[tuple[dict[str, Any], int | None]] = []
    for index, row in enumerate(rows):
        try:
            checked = model.model_validate(row).model_dump()
        except ValidationError as exc:
            problems += problems_of(exc.errors(), ("rows", index))
            continue
        valid.append((checked, checked.pop(EVENT_TIME, None)))
    if problems:
        raise InvalidRequestError(problems)
    return valid
