"""Fuzzed requests to /predict and /feedback: random bytes, truncated JSON, deep nesting, huge
numbers, wrong types and payloads above 1 MB. Every bad request is a 4xx in the project's error
shape, never a 5xx, and the process's memory stays bounded over the run."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.settings import load_settings
from examples.delivery.features import delivery_eta
from models.registry import ModelRegistry
from serving.app import create_app
from tests.helpers.serving import FakeProducer, FakeReader, trained_registry

ROW: dict[str, Any] = {
    "restaurant_id": "r001",
    "zone_id": "z1",
    "distance_km": 2.0,
    "hour_of_day": 12,
    "items": 2,
}
PREDICT = {"rows": [ROW]}
FEEDBACK = {"prediction_id": "p-1", "label": 600.0}
JSON = {"content-type": "application/json"}
PATHS = ("/predict", "/feedback")
FUZZ = settings(
    max_examples=60,
    derandomize=True,  # the same examples on every run: a failure reproduces
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
answered: list[int] = []  # every status of the run, for the summary test at the end


def dumps(value: Any) -> bytes:
    """JSON as a client library writes it (json, not orjson: integers beyond 64 bits too)."""
    return json.dumps(value).encode()


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; second field of statm, in pages)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root: Path = tmp_path_factory.mktemp("fuzz") / "models"
    trained_registry(root, delivery_eta)
    app = create_app(
        load_settings(
            models_dir=str(root),
            serve_models=["delivery_eta"],
            prediction_log_dir=str(root.parent / "prediction-log"),
        ),
        reader=FakeReader(),
        registry=ModelRegistry(str(root)),
        producer=FakeProducer(),
    )
    # raise_server_exceptions=False: a bug answers 500 here as it would to a client.
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def baseline_rss(client: TestClient) -> int:
    client.post("/predict", json=PREDICT)  # warmed up: first-request allocations are not growth
    return rss_bytes()


def refused(client: TestClient, path: str, body: bytes, headers: dict[str, str] = JSON) -> int:
    """POST a bad body; assert a 4xx in the error shape; return the status."""
    answer = client.post(path, content=body, headers=headers)
    answered.append(answer.status_code)
    assert 400 <= answer.status_code < 500, (path, body[:200], answer.status_code, answer.text)
    assert "error" in answer.json(), answer.text
    return int(answer.status_code)


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**30), max_value=10**30),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=30),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )


def not_of(kind: type) -> st.SearchStrategy[Any]:
    """JSON values that are surely not of a field's kind (strict validation: no coercion)."""
    containers = st.one_of(
        st.lists(st.integers(), max_size=3), st.dictionaries(st.text(), st.none(), max_size=2)
    )
    if kind is str:
        return st.one_of(
            st.integers(),
            st.floats(allow_nan=False, allow_infinity=False),
            st.booleans(),
            containers,
        )
    return st.one_of(st.text(max_size=10), containers)  # numbers: text, lists, objects


@FUZZ
@given(body=st.binary(max_size=3000), path=st.sampled_from(PATHS))
def test_random_bytes_are_4xx(client, baseline_rss, body, path):
    refused(client, path, body)


@FUZZ
@given(data=st.data(), path=st.sampled_from(PATHS))
def test_truncated_json_is_4xx(client, baseline_rss, data, path):
    full = orjson.dumps(PREDICT if path == "/predict" else FEEDBACK)
    cut = data.draw(st.integers(min_value=0, max_value=len(full) - 1))
    refused(client, path, full[:cut])


@FUZZ
@given(field=st.sampled_from(sorted(ROW)), data=st.data())
def test_wrong_types_in_rows_are_422_naming_the_field(client, baseline_rss, field, data):
    wrong = data.draw(not_of(str if field.endswith("_id") else float))
    body = {"rows": [ROW | {field: wrong}]}
    answer = client.post("/predict", content=dumps(body), headers=JSON)
    answered.append(answer.status_code)
    assert answer.status_code == 422, answer.text
    assert [p["field"] for p in answer.json()["detail"]] == [f"rows[0].{field}"]


@FUZZ
@given(body=json_values(), path=st.sampled_from(PATHS))
def test_arbitrary_json_bodies_are_4xx(client, baseline_rss, body, path):
    refused(client, path, dumps(body))


@FUZZ
@given(
    label=st.one_of(
        st.none(),
        st.booleans(),
        st.text(max_size=10),  # "600" too: labels are numbers, not text
        st.sampled_from(["NaN", "inf", "-Infinity", "1e999"]),
        st.lists(st.floats(allow_nan=False), max_size=3),
    ),
    prediction_id=st.one_of(st.text(min_size=65, max_size=100), st.just(""), not_of(str)),
)
def test_bad_feedback_is_422(client, baseline_rss, label, prediction_id):
    for body in (
        {"prediction_id": "p", "label": label},
        {"prediction_id": prediction_id, "label": 1.0},
    ):
        assert refused(client, "/feedback", dumps(body)) == 422


HUGE = [
    b"[" * 100_000,  # nested past any parser's recursion
    b"[" * 100_000 + b"]" * 100_000,
    b'{"rows": [' + b"[" * 900 + b"]" * 900 + b"]}",
    b'{"rows": [{"restaurant_id": ' + b'{"a": ' * 500 + b"1" + b"}" * 500 + b"}]}",
    b'{"rows": [{"distance_km": ' + b"9" * 5000 + b"}]}",  # beyond int's digit limit
    b'{"rows": [{"items": ' + b"9" * 4000 + b"}]}",
    b'{"rows": [{"distance_km": 1e999}]}',  # infinity
    b'{"rows": [{"distance_km": -1e999, "items": NaN}]}',
    b'{"prediction_id": "p", "label": 1e999}',
    b'{"prediction_id": "p", "label": NaN}',
    b'{"prediction_id": "p", "label": ' + b"9" * 4000 + b"}",
    b'{"rows": [], "model": "' + b"x" * 500_000 + b'"}',
    b'{"rows": [' + b",".join([orjson.dumps(ROW)] * 1001) + b"]}",  # more rows than allowed
    b'{"rows": [{"restaurant_id": "\\ud800", "zone_id": "z1", "distance_km": 1, '
    b'"hour_of_day": 1, "items": 1}]}',  # a lone surrogate (unencodable: broke the log)
    b'{"prediction_id": "\\udfff", "label": 1.0}',
    b"\xef\xbb\xbf" + orjson.dumps(PREDICT)[:-1],  # BOM, truncated
]


@pytest.mark.parametrize("body", HUGE, ids=range(len(HUGE)))
@pytest.mark.parametrize("path", PATHS)
def test_deep_huge_and_non_finite_inputs_are_4xx(client, baseline_rss, path, body):
    refused(client, path, body)


@pytest.mark.parametrize("path", PATHS)
def test_payloads_above_one_megabyte_are_413(client, baseline_rss, path):
    rows = b",".join([orjson.dumps(ROW)] * 13_000)  # about 1.1 MB of valid rows
    body = b'{"rows": [' + rows + b"]}"
    assert len(body) > 1_048_576
    assert refused(client, path, body) == 413

    def chunks() -> Iterator[bytes]:  # the same without Content-Length (chunked)
        for start in range(0, len(body), 65_536):
            yield body[start : start + 65_536]

    answer = client.post(path, content=chunks(), headers=JSON)
    answered.append(answer.status_code)
    assert answer.status_code == 413, answer.text
    for _ in range(20):  # repeated: nothing of a refused body stays behind
        assert refused(client, path, body) == 413


@pytest.mark.parametrize(
    "headers",
    [
        {"content-type": "text/plain"},
        {"content-type": "application/x-www-form-urlencoded"},
        {"content-type": "application/json; charset=latin-1"},
        {},
    ],
)
def test_odd_content_types_are_4xx(client, baseline_rss, headers):
    refused(client, "/predict", b"\xff\xfe rows=1", headers)


def test_no_5xx_and_memory_bounded_over_the_run(client, baseline_rss):
    """Runs last in this module: the whole fuzzed run answered, without a 5xx, in bounded
    memory; and the server still predicts."""
    assert len(answered) > 300
    assert all(status < 500 for status in answered)
    grown = rss_bytes() - baseline_rss
    assert grown < 100 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB over the fuzzed run"
    assert client.post("/predict", json=PREDICT).status_code == 200
