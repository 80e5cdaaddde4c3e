"""`sluice score` equals the predictor: the same (entity, time, version) rows scored offline with
Spark and online by the FastAPI predictor (rows replayed at their time with ``event_time``, the
online store holding what the stream would have held then) get the same feature vectors and
predictions equal within 1e-9 relative; LightGBM and the compiled model alike."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from fastapi.testclient import TestClient

from batch.backfill import materialize_view
from batch.score import compiled_available, score
from batch.train import build_labels, train_models
from cli.main import run
from core.settings import Settings
from examples.delivery.features import delivery_eta
from features.contract import window_end_at
from features.registry import load_registry
from serving.app import create_app
from tests.helpers.spark import isolated_settings, simulated_history

pytestmark = [pytest.mark.integration, pytest.mark.spark, pytest.mark.slow]
START = datetime(2026, 11, 10, 11, tzinfo=UTC)  # the lunch rush: busy windows
REQUEST = ("distance_km", "hour_of_day", "items")


@pytest.fixture(scope="module")
def settings(spark, stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    tmp: Path = tmp_path_factory.mktemp("score")
    settings = isolated_settings(stack_settings, tmp, "score_test", serve_models=["delivery_eta"])
    simulated_history(spark, settings, 20_000, START)
    train_models(settings, ["delivery_eta"], eval_fraction=0.25, rounds=50)
    return settings


def input_rows(settings: Settings) -> list[tuple[int, pd.DataFrame]]:
    """Three instants during the rush, each with 12 label rows' entities and request features
    (and a passenger column) moved to that instant; t is never on a window boundary."""
    registry = load_registry(settings.definitions_module)
    labels = build_labels(settings, registry, registry.labels["delivery_times"]).frame
    labels = labels.sort_values("event_timestamp", kind="stable").reset_index(drop=True)
    groups = []
    for k, q in enumerate((0.5, 0.7, 0.9)):
        at = int(len(labels) * q)
        t = int(labels["event_timestamp"].iloc[at]) // 1000 * 1000 + 321
        group = labels.iloc[at : at + 12].copy()
        group["event_timestamp"] = t
        group["row_id"] = [f"{k}-{i}" for i in range(len(group))]
        groups.append((t, group))
    return groups


def online_predictions(
    spark: Any, settings: Settings, groups: list[tuple[int, pd.DataFrame]]
) -> dict[str, dict[str, Any]]:
    """The predictor's answers, each group replayed at its t after the online store was given
    each entity's newest row servable at t (what the stream would have written by then)."""
    since = int((START - timedelta(days=1)).timestamp() * 1000)
    out: dict[str, dict[str, Any]] = {}
    with TestClient(create_app(settings)) as client:
        for t, group in groups:  # oldest first: the online store never goes back in time
            for view in delivery_eta.views:
                materialize_view(spark, settings, view, since, t)
            rows = [
                {
                    "restaurant_id": row["restaurant_id"],
                    "zone_id": row["zone_id"],
                    "distance_km": float(row["distance_km"]),
                    "hour_of_day": int(row["hour_of_day"]),
                    "items": int(row["items"]),
                    "event_time": t,
                }
                for row in group.to_dict("records")
            ]
            answer = client.post(
                "/predict", json={"model": "delivery_eta", "rows": rows, "return_features": True}
            )
            assert answer.status_code == 200, answer.text
            for row_id, prediction in zip(
                group["row_id"], answer.json()["predictions"], strict=True
            ):
                out[row_id] = prediction
    return out


def same(a: Any, b: Any) -> bool:
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or (isinstance(b, float) and math.isnan(b))
    return b is not None and math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


def test_score_equals_the_online_predictions(
    spark: Any, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    groups = input_rows(settings)
    table = pd.concat([group for _, group in groups], ignore_index=True)
    table[["row_id", "restaurant_id", "zone_id", *REQUEST, "event_timestamp"]].to_parquet(
        tmp_path / "rows.parquet"
    )
    native = score(
        settings,
        str(tmp_path / "rows.parquet"),
        str(tmp_path / "native"),
        predictor="native",
        spark=spark,
        show_progress=False,
    )
    assert native.rows == len(table)
    assert native.version == 1
    outputs = {"lightgbm": pd.read_parquet(tmp_path / "native")}
    if compiled_available():
        # Through the CLI, from CSV with ISO times, with the feature values written too.
        csv = table.assign(
            event_timestamp=pd.to_datetime(table["event_timestamp"], unit="ms", utc=True).map(
                lambda ts: ts.isoformat()
            )
        )
        csv.to_csv(tmp_path / "rows.csv", index=False)
        config = tmp_path / "sluice.yaml"
        config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
        paths = [str(tmp_path / "rows.csv"), str(tmp_path / "lleaves")]
        code = run(
            ["--config", str(config), "score", *paths, "--predictor", "compiled", "--features"]
        )
        assert code == 0, capsys.readouterr().err
        assert "scored 36 rows with delivery_eta v1 (lleaves)" in capsys.readouterr().out
        outputs["lleaves"] = pd.read_parquet(tmp_path / "lleaves")

    online = online_predictions(spark, settings, groups)
    views = {v.name: v for v in delivery_eta.views}
    busy = 0
    for predictor, out in outputs.items():
        assert len(out) == len(table)
        assert set(out["predictor"]) == {predictor}
        assert set(out["model_name"]) == {"delivery_eta"}
        assert set(out["model_version"]) == {1}
        for row in out.to_dict("records"):
            answer = online[row["row_id"]]
            assert answer["model_version"] == 1
            assert answer["behind"] == [], answer  # the online rows are what the contract wants
            assert same(row["prediction"], answer["prediction"]), (predictor, row, answer)
            t = int(pd.Timestamp(row["event_timestamp"]).timestamp() * 1000)
            lineage = {item["view"]: item for item in row["feature_views"]}
            assert set(lineage) == set(views)
            for name, item in lineage.items():
                end = int(pd.Timestamp(item["window_end"]).timestamp() * 1000)
                assert end == window_end_at(views[name], t)
                assert item["lateness_ms"] == views[name].lateness.total_seconds() * 1000
                served = answer["window_ends_ms"][name]
                assert served is None or served <= end
            if predictor == "lleaves":  # the same feature vector, value by value
                for ref, value in answer["features"].items():
                    group, _, feature = ref.partition(":")
                    column = f"{group}__{feature}" if group in views else feature
                    assert same(row[column], value), (ref, row, answer)
                busy += row["restaurant_orders__count_5m"] > 0
    assert not outputs.get("lleaves", pd.DataFrame()).empty or not compiled_available()
    assert busy > 0 or not compiled_available()
    assert np.isfinite(outputs["lightgbm"]["prediction"]).all()
