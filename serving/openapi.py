"""The predictor's OpenAPI document, made to match what the server does.

FastAPI derives most of it from the routes. What it cannot know is added here: /predict's
body depends on the served models (each model's rows need its entity keys and request
features, with their types and bounds), so the document is completed from the running
predictor's plans, one alternative per model; /metrics answers Prometheus text, not JSON.
The document is cached once the predictor is up (before it, it is built without the rows).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from features.schema import FieldType
from serving.features import FeaturePlan
from serving.schemas import (
    EVENT_TIME,
    EVENT_TIME_DOC,
    EVENT_TIME_PATTERN,
    MAX_EVENT_TIME_MS,
    MIN_EVENT_TIME_MS,
    PredictRequest,
)

if TYPE_CHECKING:
    from serving.predictor import Served

_JSON_TYPES = {FieldType.INT: "integer", FieldType.FLOAT: "number", FieldType.BOOL: "boolean"}


def row_schema(plan: FeaturePlan) -> dict[str, Any]:
    """One row of a model, as serving.schemas.row_model checks it."""
    properties: dict[str, Any] = {
        key: {"type": "string", "minLength": 1, "maxLength": 256} for key in plan.entity_keys
    }
    required = list(plan.entity_keys)
    for field in plan.request_fields:
        schema: dict[str, Any] = {"type": _JSON_TYPES[field.type]}
        if field.minimum is not None:
            schema["minimum"] = field.minimum
        if field.maximum is not None:
            schema["maximum"] = field.maximum
        if field.nullable:
            schema = {"anyOf": [schema, {"type": "null"}]}
        else:
            required.append(field.name)
        if field.description:
            schema["description"] = field.description
        properties[field.name] = schema
    properties[EVENT_TIME] = {
        "anyOf": [
            {"type": "integer", "minimum": MIN_EVENT_TIME_MS, "maximum": MAX_EVENT_TIME_MS - 1},
            {"type": "string", "format": "date-time", "pattern": EVENT_TIME_PATTERN},
            {"type": "null"},
        ],
        "description": EVENT_TIME_DOC,
    }
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


# deadline_ms as PredictRequest documents it (range and description from the one field).
DEADLINE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "integer", "minimum": 1, "maximum": 3_600_000},
        {"type": "null"},
    ],
    "default": None,
    "description": PredictRequest.model_fields["deadline_ms"].description,
}


def predict_request_schema(
    served: Mapping[str, Served], default: str, max_rows: int
) -> dict[str, Any]:
    """/predict's body: one alternative per served model. ``model`` names it; the default
    model's alternative also takes no ``model`` (or null)."""
    alternatives = []
    for name, one in served.items():
        model: dict[str, Any] = {"const": name}
        if name == default:
            model = {"anyOf": [model, {"type": "null"}]}
        alternatives.append(
            {
                "type": "object",
                "title": f"PredictRequest ({name})",
                "properties": {
                    "model": model | {"description": "Model name; default: " + default},
                    "rows": {
                        "type": "array",
                        "items": row_schema(one.slot.state.production.plan),
                        "minItems": 1,
                        "maxItems": max_rows,
                        "description": "Entity keys and request features, one object per "
                        f"prediction; optionally '{EVENT_TIME}' (replays).",
                    },
                    "return_features": {
                        "type": "boolean",
                        "default": False,
                        "description": "Also answer with the feature values used.",
                    },
                    "deadline_ms": DEADLINE_SCHEMA,
                },
                "required": ["rows"] if name == default else ["model", "rows"],
                "additionalProperties": False,
            }
        )
    return {"title": "PredictRequest", "oneOf": alternatives}


def install(app: FastAPI) -> None:
    """Replace app.openapi with the completed document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        metrics = spec["paths"].get("/metrics", {}).get("get")
        if metrics is not None:
            metrics["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
        predictor = getattr(app.state, "predictor", None)
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        if predictor is None:
            schemas["PredictRequest"] = {"type": "object"}
            return spec
        schemas["PredictRequest"] = predict_request_schema(
            predictor.served,
            predictor.settings.serve_models[0],
            predictor.settings.max_request_rows,
        )
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
