"""Request and response bodies, and the per-model row validation built from the definitions.

A row is flat: the entity join keys the model's views need, plus its request features, e.g.
{"restaurant_id": "r00012", "zone_id": "z03", "distance_km": 2.4, "hour_of_day": 12,
"items": 3}. Request features are validated with the type and the minimum/maximum their
definition declares (strict: no strings for numbers, no NaN); unknown fields are refused, so a
typo is a 422 naming the field rather than a silent default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from features.schema import FieldType
from serving.errors import InvalidRequestError
from serving.features import FeaturePlan

MAX_ROWS = 1000
_PY_TYPES: dict[FieldType, type] = {
    FieldType.INT: int,
    FieldType.FLOAT: float,
    FieldType.BOOL: bool,
}


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "delivery_eta",
                    "rows": [
                        {
                            "restaurant_id": "r00012",
                            "zone_id": "z03",
                            "distance_km": 2.4,
                            "hour_of_day": 12,
                            "items": 3,
                        }
                    ],
                }
            ]
        },
    )

    model: str | None = Field(None, description="Model name; default: the first served model.")
    rows: list[dict[str, Any]] = Field(
        min_length=1,
        max_length=MAX_ROWS,
        description="Entity keys and request features, one object per prediction.",
    )
    return_features: bool = Field(False, description="Also answer with the feature values used.")


class RowPrediction(BaseModel):
    prediction_id: str
    prediction: float
    model: str
    model_version: int
    feature_ages_ms: dict[str, int | None] = Field(
        description="Per view: now minus the window end of the online row used (null: no row)."
    )
    missing: list[str] = Field(
        description="Views with no online row (their documented defaults were used) and "
        "'view:feature' values that were null (NaN to the model)."
    )
    stale: list[str] = Field(description="Views whose row is older than the view's ttl.")
    features: dict[str, Any] | None = None


class PredictResponse(BaseModel):
    predictions: list[RowPrediction]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prediction_id: str = Field(min_length=1, max_length=64)
    label: float = Field(allow_inf_nan=False, description="The observed outcome.")


class FeedbackResponse(BaseModel):
    prediction_id: str
    matched: bool = Field(description="Whether this server made the prediction (recently).")
    error: float | None = None


class PromoteResponse(BaseModel):
    model: str
    version: int
    previous_version: int | None
    served: bool


def row_model(plan: FeaturePlan, name: str) -> type[BaseModel]:
    """A pydantic model of one row for a plan: entity keys, then request features."""
    fields: dict[str, Any] = {
        key: (str, Field(min_length=1, max_length=256, strict=True)) for key in plan.entity_keys
    }
    for request_field in plan.request_fields:
        python_type: Any = _PY_TYPES[request_field.type]
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
        if error.get("type") == "json_invalid":  # loc is ('body', <character position>)
            detail = (error.get("ctx") or {}).get("error", "")
            where = error["loc"][-1]
            out.append({"field": "body", "reason": f"invalid JSON at character {where}: {detail}"})
            continue
        problem: dict[str, Any] = {
            "field": field_path([*prefix, *error["loc"]]),
            "reason": error["msg"],
        }
        if error.get("type") != "missing" and "input" in error:
            problem["input"] = error["input"]
        out.append(problem)
    return out


def validate_rows(model: type[BaseModel], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row checked; one 422 naming every bad field of every row."""
    problems: list[dict[str, Any]] = []
    valid: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        try:
            valid.append(model.model_validate(row).model_dump())
        except ValidationError as exc:
            problems += problems_of(exc.errors(), ("rows", index))
    if problems:
        raise InvalidRequestError(problems)
    return valid
