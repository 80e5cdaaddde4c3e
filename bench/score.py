"""Benchmark: the model stage of `sluice score`, LightGBM against the lleaves-compiled model and
against a row-at-a-time baseline, in one run.

A ``delivery_eta`` model is trained like `sluice train` trains it (models.fit, 200 rounds) on a
synthetic training set. Then, on the same rows:

1. in this process, one thread: LightGBM on batches of 10,000 rows (what mapInPandas hands a
   Python worker), the compiled model on the same batches, and LightGBM one row at a time; the
   compile time (cold, no cache) is printed beside them;
2. with Spark (local[2]): the scoring stage of `sluice score` (batch.score.predict_batches in
   mapInPandas, the model text broadcast) over N rows of features held in memory, written to
   Spark's noop sink, for both evaluators (in turns, the best of ``--repeat`` runs each),
   against a plain Python UDF that calls LightGBM once per row (a smaller N: it is slow).

The evaluators take turns within each measurement, so that load from other processes on the
machine falls on all of them alike: the ratios are the numbers to read.

Predictions must be equal within 1e-9 relative; the run fails otherwise. Prints rows/s, the
ratios and how many rows pay back a cold compile. Run: ``python -m bench.score --rows 500000``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from batch.score import (
    CompiledEvaluator,
    NativeEvaluator,
    compiled_available,
    equal,
    evaluator,
    predict_batches,
)
from batch.session import spark_session
from core.settings import load_settings
from examples.delivery.features import delivery_eta
from models.fit import fit, model_features
from tests.helpers.serving import synthetic_training_set

BATCH = 10_000


def train_model(rounds: int) -> tuple[str, list[str]]:
    frame = synthetic_training_set(delivery_eta, n=5_000, seed=11)
    trained = fit(frame, delivery_eta, label="delivery_seconds", rounds=rounds)
    return trained.model_text, [column for _, column in model_features(delivery_eta)]


def feature_matrix(rows: int, columns: int, seed: int = 5) -> Any:
    rng = np.random.default_rng(seed)
    matrix = rng.gamma(2.0, 3.0, (rows, columns))
    matrix[rng.random(matrix.shape) < 0.05] = np.nan
    return matrix


def rate(rows: int, seconds: float) -> float:
    return rows / seconds if seconds > 0 else float("inf")


def in_process(model_text: str, rows: int, single_rows: int) -> dict[str, float]:
    """Rows/s of each evaluator on one thread, and the compile seconds. The evaluators take
    turns batch by batch (and the per-row baseline a row at a time between them), so that
    load from other processes falls on all of them alike."""
    matrix = feature_matrix(rows, len(model_features(delivery_eta)))
    evaluators: dict[str, Any] = {"native": NativeEvaluator(model_text)}
    out: dict[str, float] = {}
    if compiled_available():
        with tempfile.TemporaryDirectory() as cache:
            began = time.perf_counter()
            evaluators["compiled"] = CompiledEvaluator(model_text, Path(cache))
            out["compile_s"] = time.perf_counter() - began
    seconds = dict.fromkeys([*evaluators, "row_at_a_time"], 0.0)
    predictions: dict[str, list[Any]] = {kind: [] for kind in evaluators}
    single_every = max(1, rows // BATCH)
    for i in range(0, rows, BATCH):
        for kind, model in evaluators.items():
            began = time.perf_counter()
            predictions[kind].append(model.predict(matrix[i : i + BATCH]))
            seconds[kind] += time.perf_counter() - began
        began = time.perf_counter()
        for j in range(i, i + single_rows // single_every):
            evaluators["native"].predict(matrix[j : j + 1])
        seconds["row_at_a_time"] += time.perf_counter() - began
    out |= {kind: rate(rows, seconds[kind]) for kind in evaluators}
    out["row_at_a_time"] = rate(
        single_rows // single_every * single_every, seconds["row_at_a_time"]
    )
    if "compiled" in evaluators:
        expected = np.concatenate(predictions["native"])
        got = np.concatenate(predictions["compiled"])
        scale = np.maximum(np.abs(expected), 1e-300)
        out["max_relative_difference"] = float(np.max(np.abs(got - expected) / scale))
        if not equal(got, expected):
            raise SystemExit("the compiled model's predictions differ from LightGBM's")
    return out


def spark_stage(
    model_text: str, columns: list[str], rows: int, baseline_rows: int, repeat: int
) -> dict[str, float]:
    """Rows/s of the scoring stage in Spark: mapInPandas per evaluator, a per-row UDF."""
    from pyspark.sql import functions as sf
    from pyspark.sql.types import DoubleType, StringType, StructField, StructType

    spark = spark_session(load_settings(spark_master="local[2]"))
    generated = [
        sf.when(sf.rand(seed=i) < 0.05, sf.lit(None))
        .otherwise(sf.rand(seed=100 + i) * 20)
        .alias(column)
        for i, column in enumerate(columns)
    ]
    frame = spark.range(rows).select(*generated).repartition(4).cache()
    frame.count()
    schema = StructType(
        [
            *frame.schema.fields,
            StructField("prediction", DoubleType()),
            StructField("predictor", StringType()),
        ]
    )
    broadcast = spark.sparkContext.broadcast(model_text)
    out: dict[str, float] = {}
    kinds = ["native", *(["compiled"] if compiled_available() else [])]
    if compiled_available():
        evaluator("compiled", model_text)  # the host cache the workers load from
    runs = {kind: predict_batches(lambda: broadcast.value, columns, kind) for kind in kinds}
    for run in runs.values():  # warm up: workers start, import and load the model, untimed
        frame.sample(0.005, seed=1).mapInPandas(run, schema).write.format("noop").mode(
            "overwrite"
        ).save()
    for _ in range(repeat):  # in turns; the best of each, as load from elsewhere comes and goes
        for kind, run in runs.items():
            began = time.perf_counter()
            frame.mapInPandas(run, schema).write.format("noop").mode("overwrite").save()
            best = rate(rows, time.perf_counter() - began)
            out[f"spark_{kind}"] = max(out.get(f"spark_{kind}", 0.0), best)

    loaded: dict[str, NativeEvaluator] = {}  # per task: the booster, parsed once

    def one_row(*values: float | None) -> float:
        if not loaded:
            loaded["model"] = NativeEvaluator(broadcast.value)
        model = loaded["model"]
        vector = np.array([[np.nan if v is None else v for v in values]], dtype=np.float64)
        return float(model.predict(vector)[0])

    per_row = sf.udf(one_row, DoubleType())
    small = frame.limit(baseline_rows).cache()
    small.count()
    frame.sample(0.005, seed=1).select(per_row(*columns)).write.format("noop").mode(
        "overwrite"
    ).save()
    began = time.perf_counter()
    small.select(per_row(*columns).alias("prediction")).write.format("noop").mode(
        "overwrite"
    ).save()
    out["spark_row_udf"] = rate(baseline_rows, time.perf_counter() - began)
    frame.unpersist()
    small.unpersist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=500_000, help="rows scored with Spark")
    parser.add_argument("--repeat", type=int, default=2, help="Spark runs per evaluator")
    parser.add_argument("--baseline-rows", type=int, default=100_000, help="rows for the UDF")
    parser.add_argument("--local-rows", type=int, default=200_000, help="rows in process")
    parser.add_argument("--rounds", type=int, default=200, help="boosting rounds of the model")
    args = parser.parse_args()
    model_text, columns = train_model(args.rounds)
    local = in_process(model_text, args.local_rows, min(args.local_rows, 20_000))
    print(f"model: delivery_eta, {args.rounds} trees, {len(columns)} inputs")
    print(
        f"in process, 1 thread:  native {local['native']:,.0f} rows/s   "
        f"row-at-a-time {local['row_at_a_time']:,.0f} rows/s "
        f"(native x{local['native'] / local['row_at_a_time']:.1f})"
    )
    if "compiled" in local:
        payback = local["compile_s"] / (1 / local["native"] - 1 / local["compiled"])
        print(
            f"                       compiled {local['compiled']:,.0f} rows/s "
            f"(x{local['compiled'] / local['native']:.2f} native); cold compile "
            f"{local['compile_s']:.1f} s, paid back after {payback:,.0f} rows; max relative "
            f"difference {local['max_relative_difference']:.1e}"
        )
    else:
        print("                       compiled: lleaves is not installed")
    stage = spark_stage(model_text, columns, args.rows, args.baseline_rows, args.repeat)
    print(
        f"spark local[2], {args.rows:,} rows: native {stage['spark_native']:,.0f} rows/s   "
        f"per-row UDF ({args.baseline_rows:,} rows) {stage['spark_row_udf']:,.0f} rows/s "
        f"(native x{stage['spark_native'] / stage['spark_row_udf']:.1f})"
    )
    if "spark_compiled" in stage:
        print(
            f"                       compiled {stage['spark_compiled']:,.0f} rows/s "
            f"(x{stage['spark_compiled'] / stage['spark_native']:.2f} native, "
            f"x{stage['spark_compiled'] / stage['spark_row_udf']:.1f} per-row UDF)"
        )


if __name__ == "__main__":
    main()
