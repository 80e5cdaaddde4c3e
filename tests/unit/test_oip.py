"""Open Inference Protocol v2 routes, driven by a real client (tritonclient[http]) against the
predictor served by uvicorn on loopback, with a fake online store and a fake Kafka producer."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from core.records import PredictionRecord
from core.settings import load_settings
from examples.delivery.features import (
    delivery_eta,
    restaurant_orders,
    restaurant_prep,
    zone_couriers,
)
from features.contract import window_end_at
from serving.app import create_app
from tests.helpers.http import served_in_thread
from tests.helpers.serving import FakeProducer, FakeReader, random_row, trained_registry

ROWS = [
    {"restaurant_id": f"r{i:03d}", "zone_id": f"z{i % 5}", "distance_km": 1.5 + i,
     "hour_of_day": (9 + i) % 24, "items": 1 + i % 4}
    for i in range(6)
]  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FakeProducer]]:
    """The predictor (versions 1 and 2 served: a bandit with two arms) on a real socket."""
    tmp: Path = tmp_path_factory.mktemp("oip")
    registry = trained_registry(tmp / "models", delivery_eta, versions=2)
    reader, producer, rng = FakeReader(), FakeProducer(), random.Random(7)
    now = int(time.time() * 1000)
    for view in (restaurant_orders, zone_couriers, restaurant_prep):
        keys = (
            [f"z{i}" for i in range(5)]
            if view is zone_couriers
            else [f"r{i:03d}" for i in range(6)]
        )
        for key in keys:
            reader.put(view, key, window_end_at(view, now), random_row(view, rng))
    settings = load_settings(
        models_dir=str(tmp / "models"),
        serve_models=["delivery_eta"],
        bandit_epsilon=0.5,
        bandit_arms=2,
    )
    app = create_app(settings, reader=reader, registry=registry, producer=producer)
    with served_in_thread(app) as address:
        yield address, producer


@pytest.fixture
def client(stack: tuple[str, FakeProducer]) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(stack[0])
    yield client
    client.close()


def tensors(rows: list[dict[str, Any]], binary: bool) -> list[triton.InferInput]:
    columns = {
        "restaurant_id": np.array([r["restaurant_id"] for r in rows], dtype=np.object_),
        "zone_id": np.array([r["zone_id"] for r in rows], dtype=np.object_),
        "distance_km": np.array([r["distance_km"] for r in rows], dtype=np.float64),
        "hour_of_day": np.array([r["hour_of_day"] for r in rows], dtype=np.int64),
        "items": np.array([r["items"] for r in rows], dtype=np.int64),
    }
    out = []
    for name, values in columns.items():
        datatype = {"O": "BYTES", "f": "FP64", "i": "INT64"}[values.dtype.kind]
        tensor = triton.InferInput(name, [len(rows)], datatype)
        out.append(tensor.set_data_from_numpy(values, binary_data=binary))
    return out


def test_oip_health_and_model_metadata_come_from_the_served_plan(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    assert client.is_model_ready("delivery_eta")
    assert client.is_model_ready("delivery_eta", "2")
    assert not client.is_model_ready("delivery_eta", "7")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_model_metadata("delivery_eta")
    assert meta["versions"] == ["1", "2"]
    assert {(i["name"], i["datatype"]) for i in meta["inputs"]} == {
        ("restaurant_id", "BYTES"),
        ("zone_id", "BYTES"),
        ("distance_km", "FP64"),
        ("hour_of_day", "INT64"),
        ("items", "INT64"),
    }
    assert [o["name"] for o in meta["outputs"]] == ["prediction", "model_version", "prediction_id"]
    assert client.get_model_metadata("delivery_eta", "2")["name"] == "delivery_eta"


def predictions_logged(producer: FakeProducer) -> list[PredictionRecord]:
    return [
        PredictionRecord.decode(m.value())
        for m in producer.delivered
        if m.topic() == "sluice.predictions"
    ]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_oip_infer_answers_what_predict_answers_for_the_same_version(client, stack, binary):
    """Per version, OIP's predictions equal /predict's for the same rows, and every row is
    logged to the prediction log once, with an id /feedback knows."""
    address, producer = stack
    with httpx.Client(base_url=f"http://{address}") as http:
        answers = http.post("/predict", json={"rows": ROWS}).json()["predictions"]
        for version in (1, 2):
            result = client.infer(
                "delivery_eta",
                tensors(ROWS, binary),
                model_version=str(version),
                request_id="req-1",
                outputs=[
                    triton.InferRequestedOutput(n)
                    for n in ("prediction", "model_version", "prediction_id")
                ],
            )
            response = result.get_response()
            assert response["model_version"] == str(version)
            assert response["id"] == "req-1"
            assert result.as_numpy("model_version").tolist() == [version] * len(ROWS)
            predictions = result.as_numpy("prediction")
            assert predictions.dtype == np.float64
            assert predictions.shape == (len(ROWS),)
            same = [i for i, a in enumerate(answers) if a["model_version"] == version]
            np.testing.assert_allclose(predictions[same], [answers[i]["prediction"] for i in same])
            ids = [
                i.decode() if isinstance(i, bytes) else i for i in result.as_numpy("prediction_id")
            ]
            # The log is sent in the background: wait for these ids (earlier /predict records
            # may still be arriving too, so they are picked by id, not by position).
            deadline = time.monotonic() + 10
            while True:
                records = [r for r in predictions_logged(producer) if r.prediction_id in ids]
                if len(records) >= len(ROWS):
                    break
                assert time.monotonic() < deadline, "predictions not logged"
                time.sleep(0.02)
            assert len(records) == len(ROWS)
            assert {r.prediction_id: r.request for r in records} == dict(
                zip(ids, ROWS, strict=True)
            )
            assert {r.model_version for r in records} == {version}
            feedback = http.post("/feedback", json={"prediction_id": ids[0], "label": 600.0})
            assert feedback.json()["matched"] is True
        assert {a["model_version"] for a in answers} <= {1, 2}


def test_oip_infer_without_version_lets_the_policy_choose(client):
    result = client.infer("delivery_eta", tensors(ROWS, binary=True))
    assert set(result.as_numpy("model_version").tolist()) <= {1, 2}
    assert np.all(np.isfinite(result.as_numpy("prediction")))


def _error(
    client: triton.InferenceServerClient, inputs: list[Any], **kw: Any
) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(kw.pop("model", "delivery_eta"), inputs, **kw)
    return caught.value


def test_oip_errors_name_the_input_and_use_400_or_404(client):
    good = tensors(ROWS[:2], binary=False)
    unknown = triton.InferInput("colour", [2], "BYTES").set_data_from_numpy(
        np.array(["red", "blue"], dtype=np.object_), binary_data=False
    )
    error = _error(client, [*good, unknown])
    assert error.status() == "400"
    assert "'colour'" in error.message()

    error = _error(client, good[:-1])  # no items
    assert error.status() == "400"
    assert "items" in error.message()

    wrong_type = triton.InferInput("items", [2], "FP64").set_data_from_numpy(
        np.array([1.0, 2.0]), binary_data=True
    )
    error = _error(client, [*good[:-1], wrong_type])
    assert error.status() == "400"
    assert "'items' takes" in error.message()

    bad_rows = [dict(r) for r in ROWS[:2]]
    bad_rows[1]["hour_of_day"] = 99
    error = _error(client, tensors(bad_rows, binary=True))
    assert error.status() == "400"
    assert "hour_of_day[1]" in error.message()

    short = triton.InferInput("items", [3], "INT64").set_data_from_numpy(
        np.array([1, 2, 3]), binary_data=False
    )
    error = _error(client, [*good[:-1], short])
    assert error.status() == "400"
    assert "differ in length" in error.message()

    assert _error(client, good, model="nope").status() == "404"
    error = _error(client, good, model_version="9")
    assert error.status() == "404"
    assert "version '9'" in error.message()
