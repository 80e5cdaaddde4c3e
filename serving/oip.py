"""Open Inference Protocol v2 (KServe / Triton REST) beside the predictor's own routes.

A model's inputs are named tensors, one per field of a /predict row: its entity keys (BYTES)
and request features (INT64, FP64 or BOOL, as defined), each of shape [n] for n rows; an
optional ``event_time`` tensor (INT64 epoch ms, or BYTES ISO-8601) replays rows at a time.
Inputs come as JSON ``data`` or, with the binary tensor extension (what tritonclient sends by
default), as raw bytes after the JSON header (header ``Inference-Header-Content-Length``).
The rows take the same path as /predict (Predictor.predict_rows: the row model's checks, the
batcher, the prediction log). Outputs: ``prediction`` (FP64 [n]), ``model_version`` (INT64
[n]: the version that answered each row) and ``prediction_id`` (BYTES [n], for /feedback), in
JSON. Errors are OIP's {"error": "<message>"}: 400 for a bad request, 404 for an unknown model
or version, 503 when the server cannot answer now.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import SluiceError, http_status
from features.schema import FieldType
from serving.auth import Scope, require
from serving.deadlines import HEADER
from serving.errors import InvalidRequestError, ModelNotFoundError
from serving.features import FeaturePlan
from serving.schemas import EVENT_TIME, problems_of

if TYPE_CHECKING:
    from serving.predictor import Predictor, Served

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip
_NUMPY: dict[str, str] = {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}  # fmt: skip
_INTEGERS = frozenset(k for k in _NUMPY if "INT" in k)
# Which tensor datatypes a row field takes (request feature type -> datatypes).
_ACCEPTS: dict[FieldType, frozenset[str]] = {
    FieldType.INT: _INTEGERS,
    FieldType.FLOAT: frozenset({"FP16", "FP32", "FP64"}) | _INTEGERS,
    FieldType.BOOL: frozenset({"BOOL"}),
}
_DATATYPE = {FieldType.INT: "INT64", FieldType.FLOAT: "FP64", FieldType.BOOL: "BOOL"}
OUTPUTS = {"prediction": "FP64", "model_version": "INT64", "prediction_id": "BYTES"}
HEADER_LENGTH = "inference-header-content-length"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True)


class InferInput(_Strict):
    name: str = Field(min_length=1)
    shape: list[int] = Field(description="[n] (or [n, 1]): one element per row")
    datatype: Datatype
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(None, description="Row-major; absent with binary data.")


class RequestedOutput(_Strict):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(_Strict):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any]


class InferResponse(BaseModel):
    model_name: str
    model_version: str = Field(description="The version asked for, else production's.")
    id: str | None = None
    outputs: list[OutputTensor]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class OipError(BaseModel):
    error: str


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its $defs put in place (the OpenAPI document holds it
    inline, where '#/$defs/...' would not resolve)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return node

    inlined: dict[str, Any] = walk(schema)
    return inlined


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OipError, "description": "a bad request; the message names the input"},
    404: {"model": OipError, "description": "no such model or version is served here"},
    503: {"model": OipError, "description": "the server cannot answer now (retry later)"},
}
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _inline(InferRequest.model_json_schema())}},
    }
}


def _error(exc: SluiceError) -> Response:
    status = http_status(exc)
    status = 400 if status in (409, 422) else status
    return Response(orjson.dumps({"error": str(exc)}), status, media_type="application/json")


def _predictor(request: Request) -> Predictor:
    predictor: Predictor = request.app.state.predictor
    return predictor


def _served(request: Request, name: str, version: str | None) -> tuple[Served, int | None]:
    served = _predictor(request).served.get(name)
    if served is None:
        raise ModelNotFoundError(f"model {name!r} is not served here")
    if version is None:
        return served, None
    arms = served.slot.state.arms
    if not version.isdigit() or int(version) not in arms:
        raise ModelNotFoundError(
            f"model {name!r} version {version!r} is not served here "
            f"(served: {', '.join(map(str, sorted(arms)))})"
        )
    return served, int(version)


def _plan(served: Served, version: int | None) -> FeaturePlan:
    state = served.slot.state
    return (state.production if version is None else state.arms[version]).plan


def input_datatypes(plan: FeaturePlan) -> dict[str, frozenset[str]]:
    """Each input a model takes and the tensor datatypes it accepts."""
    accepts = {key: frozenset({"BYTES"}) for key in plan.entity_keys}
    accepts |= {field.name: _ACCEPTS[field.type] for field in plan.request_fields}
    accepts[EVENT_TIME] = frozenset({"BYTES"}) | _INTEGERS
    return accepts


def metadata(name: str, served: Served, version: int | None) -> ModelMetadata:
    plan = _plan(served, version)
    inputs = [TensorMetadata(name=key, datatype="BYTES", shape=[-1]) for key in plan.entity_keys]
    inputs += [
        TensorMetadata(name=field.name, datatype=_DATATYPE[field.type], shape=[-1])
        for field in plan.request_fields
    ]
    return ModelMetadata(
        name=name,
        versions=[str(v) for v in sorted(served.slot.state.arms)],
        platform="lightgbm",
        inputs=inputs,
        outputs=[TensorMetadata(name=n, datatype=d, shape=[-1]) for n, d in OUTPUTS.items()],
    )


def _bytes_elements(raw: bytes, name: str) -> list[str]:
    """BYTES in the binary extension: each element a 4-byte little-endian length, then it."""
    out, position = [], 0
    while position < len(raw):
        if position + 4 > len(raw):
            raise _bad(f"input {name!r}: truncated BYTES element")
        (length,) = struct.unpack_from("<I", raw, position)
        position += 4
        element = raw[position : position + length]
        if len(element) != length:
            raise _bad(f"input {name!r}: truncated BYTES element")
        position += length
        try:
            out.append(element.decode())
        except UnicodeDecodeError:
            raise _bad(f"input {name!r}: an element is not UTF-8") from None
    return out


def _bad(reason: str, field: str = "inputs") -> InvalidRequestError:
    return InvalidRequestError([{"field": field, "reason": reason}])


def _values(tensor: InferInput, binary: memoryview, position: int) -> tuple[list[Any], int]:
    """The tensor's elements (flat) and the position after its binary data."""
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        if tensor.data is None:
            raise _bad(f"input {tensor.name!r} has neither data nor binary_data_size")
        data = tensor.data
        while data and isinstance(data[0], list):  # row-major nested lists: flatten
            data = [value for inner in data for value in inner]
        return data, position
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise _bad(f"input {tensor.name!r}: binary_data_size must be a non-negative integer")
    raw = bytes(binary[position : position + size])
    if len(raw) != size:
        raise _bad(f"input {tensor.name!r}: {size} bytes of binary data announced, {len(raw)} sent")
    if tensor.datatype == "BYTES":
        return _bytes_elements(raw, tensor.name), position + size
    dtype = np.dtype(_NUMPY[tensor.datatype])
    if size % dtype.itemsize:
        raise _bad(f"input {tensor.name!r}: {size} bytes is not a whole number of elements")
    values: list[Any] = np.frombuffer(raw, dtype=dtype).tolist()
    return values, position + size


def parse_infer(body: bytes, header_length: str | None) -> tuple[InferRequest, memoryview]:
    """The JSON part of an infer request (checked) and the binary data after it."""
    split = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _bad(f"Inference-Header-Content-Length {header_length[:20]!r} is not a length "
                       f"within the body's {len(body)} bytes", "headers")  # fmt: skip
        split = int(header_length)
    try:
        request = InferRequest.model_validate_json(body[:split])
    except ValidationError as exc:
        raise InvalidRequestError(problems_of(exc.errors())) from None
    return request, memoryview(body)[split:]


def rows_of(request: InferRequest, binary: memoryview, plan: FeaturePlan) -> list[dict[str, Any]]:
    """Tensors -> one row per element, each input checked against what the model takes."""
    accepts = input_datatypes(plan)
    columns: dict[str, list[Any]] = {}
    position = 0
    for tensor in request.inputs:
        if tensor.name not in accepts:
            raise _bad(f"input {tensor.name!r} is not an input of this model "
                       f"(inputs: {', '.join(accepts)})")  # fmt: skip
        if tensor.name in columns:
            raise _bad(f"input {tensor.name!r} is given twice")
        if tensor.datatype not in accepts[tensor.name]:
            raise _bad(f"input {tensor.name!r} takes {' or '.join(sorted(accepts[tensor.name]))}, "
                       f"not {tensor.datatype}")  # fmt: skip
        if not 1 <= len(tensor.shape) <= 2 or tensor.shape[1:] not in ([], [1]):
            raise _bad(f"input {tensor.name!r}: shape {tensor.shape} is not [n] or [n, 1]")
        values, position = _values(tensor, binary, position)
        if len(values) != tensor.shape[0]:
            raise _bad(f"input {tensor.name!r}: shape {tensor.shape} but {len(values)} elements")
        columns[tensor.name] = values
    if position != len(binary):
        raise _bad(f"{len(binary) - position} bytes of binary data belong to no input")
    counts = {len(values) for values in columns.values()}
    if len(counts) != 1:
        raise _bad(
            "inputs differ in length: " + ", ".join(f"{k} {len(v)}" for k, v in columns.items())
        )
    n = counts.pop()
    if n < 1:  # the most per request: max_request_rows, checked on the predict path
        raise _bad(f"{n} rows: at least 1 per request")
    return [{name: values[i] for name, values in columns.items()} for i in range(n)]


def _renamed(exc: InvalidRequestError) -> InvalidRequestError:
    """Row problems ('rows[3].items') named as the inputs the caller sent ('items[3]')."""
    problems = []
    for problem in exc.problems:
        match = re.fullmatch(r"rows\[(\d+)\]\.(.+)", problem["field"])
        field = f"input {match[2]}[{match[1]}]" if match else problem["field"]
        problems.append(problem | {"field": field})
    return InvalidRequestError(problems)


def outputs_of(
    requested: Sequence[RequestedOutput] | None, predictions: Sequence[Any]
) -> list[dict[str, Any]]:
    names = [o.name for o in requested] if requested else list(OUTPUTS)
    unknown = [name for name in names if name not in OUTPUTS]
    if unknown:
        raise _bad(f"output(s) {', '.join(map(repr, unknown))} unknown (outputs: "
                   f"{', '.join(OUTPUTS)})", "outputs")  # fmt: skip
    data = {
        "prediction": [p.prediction for p in predictions],
        "model_version": [p.version for p in predictions],
        "prediction_id": [p.prediction_id for p in predictions],
    }
    n = len(predictions)
    return [{"name": k, "datatype": OUTPUTS[k], "shape": [n], "data": data[k]} for k in names]


async def _infer(request: Request, name: str, version: str | None) -> Response:
    try:
        served, number = _served(request, name, version)
        infer, binary = parse_infer(await request.body(), request.headers.get(HEADER_LENGTH))
        rows = rows_of(infer, binary, _plan(served, number))
        try:
            predictions = await _predictor(request).predict_rows(
                served, rows, number, timeout_header=request.headers.get(HEADER)
            )
        except InvalidRequestError as exc:
            raise _renamed(exc) from None
        answer = {
            "model_name": name,
            "model_version": str(number or served.slot.state.production.version),
            "id": infer.id,
            "outputs": outputs_of(infer.outputs, predictions),
        }
    except SluiceError as exc:
        return _error(exc)
    return Response(orjson.dumps(answer), media_type="application/json")


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="sluice", version="1", extensions=["binary_tensor_data"])


@router.get("/health/live", response_model=Live)
async def live() -> Live:
    return Live(live=True)


@router.get("/health/ready", response_model=Ready, responses={503: {"model": Ready}})
async def ready(request: Request) -> Response:
    up = getattr(request.app.state, "predictor", None) is not None
    return Response(orjson.dumps({"ready": up}), 200 if up else 503, media_type="application/json")


async def _model_ready(request: Request, name: str, version: str | None) -> Response:
    try:
        _served(request, name, version)
    except SluiceError as exc:
        return _error(exc)
    return Response(orjson.dumps({"name": name, "ready": True}), media_type="application/json")


async def _metadata(request: Request, name: str, version: str | None) -> Response:
    try:
        served, number = _served(request, name, version)
    except SluiceError as exc:
        return _error(exc)
    return Response(metadata(name, served, number).model_dump_json(), media_type="application/json")


_GETS: dict[int | str, dict[str, Any]] = {404: _ERRORS[404]}
# A model's routes need the predict scope, as /predict and GET /models do; the server's
# health and metadata stay open (orchestrators probe them without credentials).
_PREDICT = [require(Scope.PREDICT)]


Handler = Callable[[Request, str, str | None], Awaitable[Response]]


def _model_routes(
    method: str,
    suffix: str,
    handler: Handler,
    names: tuple[str, str],
    docs: tuple[str | None, str | None] = (None, None),
    **options: Any,
) -> None:
    """A model's route and its version's (``/models/{name}<suffix>`` and
    ``/models/{name}/versions/{version}<suffix>``), both answered by ``handler`` (version None
    for the first), named ``names`` (the OpenAPI operation ids), described by ``docs``."""

    async def of_model(name: str, request: Request) -> Response:
        return await handler(request, name, None)

    async def of_version(name: str, version: str, request: Request) -> Response:
        return await handler(request, name, version)

    paths = (f"/models/{{name}}{suffix}", f"/models/{{name}}/versions/{{version}}{suffix}")
    endpoints: tuple[Callable[..., Awaitable[Response]], ...] = (of_model, of_version)
    for path, endpoint, name, doc in zip(paths, endpoints, names, docs, strict=True):
        router.add_api_route(
            path,
            endpoint,
            methods=[method],
            name=name,
            description=doc,
            dependencies=_PREDICT,
            **options,
        )


_model_routes(
    "GET",
    "",
    _metadata,
    ("model_metadata", "version_metadata"),
    response_model=ModelMetadata,
    responses=_GETS,
)
_model_routes(
    "GET",
    "/ready",
    _model_ready,
    ("model_ready", "version_ready"),
    response_model=ModelReady,
    responses=_GETS,
)
_model_routes(
    "POST",
    "/infer",
    _infer,
    ("infer", "version_infer"),
    (
        "Predict the rows the input tensors make, with the policy's choice of version.",
        "Predict the rows the input tensors make with this version (one of those served).",
    ),
    response_model=InferResponse,
    responses=_ERRORS,
    openapi_extra=_INFER_BODY,
)
