"""`sluice score`: offline batch scoring with Spark, by the same contract as training and serving.

An input table (parquet or CSV) holds one row per prediction: the join keys of the model's
feature service, ``event_timestamp`` (a timestamp, epoch milliseconds or an ISO-8601 string;
UTC when it names no zone) and the request features the model reads; other columns are carried
through. Each row gets the point-in-time features of ``batch.training.training_set`` (the value
of every view at t is the newest window servable at t: the contract of features/contract.py,
which the predictor serves too), then the prediction of one model version (default: the
production one), and is written as parquet with its lineage:

    prediction      double
    model_name, model_version, feature_service
    feature_views   array<struct<view, definition, lateness_ms, window_end>>: per view the model
                    reads, a hash of its definition, its lateness and the window end whose value
                    the row used, E(t) = floor((t - lateness) / slide) * slide
    predictor       the evaluator that computed it ("lightgbm", or "lleaves" compiled)
    scored_at       when this run started

Model evaluation is vectorised: ``mapInPandas`` hands each Python worker Arrow batches; the model
text is a broadcast variable (shipped once per executor) and the loaded model is kept per worker
process, keyed by the text's digest. Two evaluators give the same numbers: LightGBM itself, and
the model compiled to machine code by lleaves (LLVM; float64 throughout). `python -m bench.score`
measures both: compiled evaluation is several times faster, but compiling costs seconds per
model and host (cached on disk, keyed by the model and the CPU). ``predictor="auto"`` therefore
compiles when lleaves is installed and either the host cache has the model or the input is large
(COMPILED_MIN_ROWS); every task checks the first rows of its first batch against LightGBM
(equal within 1e-9 relative) and falls back to LightGBM, counted, if they differ.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import pandas as pd

from batch.compile import spark_type
from batch.errors import (
    ScoreConflictError,
    ScoreCountError,
    ScoreInputError,
    SluiceBatchError,
)
from core.errors import UsageError
from core.settings import Settings
from features.contract import lateness_ms
from features.definitions import FeatureService, FeatureView
from features.labels import EVENT_TIMESTAMP

if TYPE_CHECKING:
    import numpy.typing as npt
    from pyspark.sql import Column, DataFrame, SparkSession
    from rich.console import Console

Predictor = Literal["auto", "native", "compiled"]
# Below this many rows, "auto" compiles only a model already in the host's cache: compiling a
# 200-tree model took 7-22 s here, and the Spark stage gained ~7 us a row on local[2] (91k
# rows/s with LightGBM, 290k compiled), so about a million rows pay a cold compile back
# (`python -m bench.score` prints the numbers of the machine it runs on).
COMPILED_MIN_ROWS = 1_000_000
CHECK_ROWS = 256  # rows of each task's first batch evaluated both ways
RTOL, ATOL = 1e-9, 1e-12  # "equal": relative 1e-9 (absolute 1e-12 around zero)
CACHE_DIR = Path(tempfile.gettempdir()) / "sluice-lleaves"
OUTPUT_COLUMNS = (
    "prediction",
    "model_name",
    "model_version",
    "feature_service",
    "feature_views",
    "predictor",
    "scored_at",
)


class Evaluator(Protocol):
    kind: str

    def predict(self, matrix: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]: ...


class NativeEvaluator:
    kind = "lightgbm"

    def __init__(self, model_text: str) -> None:
        import lightgbm as lgb

        self.booster = lgb.Booster(model_str=model_text)

    def predict(self, matrix: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.asarray(self.booster.predict(matrix, num_threads=1), dtype=np.float64)


class CompiledEvaluator:
    """The model compiled by lleaves; the object code is cached per model and CPU on disk."""

    kind = "lleaves"

    def __init__(self, model_text: str, cache_dir: Path = CACHE_DIR) -> None:
        import lleaves  # type: ignore[import-untyped, import-not-found, unused-ignore]

        cache_dir.mkdir(parents=True, exist_ok=True)
        model_file = cache_dir / f"{digest(model_text)}.txt"
        if not model_file.exists():
            _replace(model_file, model_text.encode())
        self.model = lleaves.Model(model_file=str(model_file))
        cached = compiled_cache(model_text, cache_dir)
        if cached.exists():
            self.model.compile(cache=str(cached))
        else:  # compile into a file of our own, then rename: workers may race on one host
            partial = cached.with_name(f"{cached.name}.{uuid.uuid4().hex}.tmp")
            self.model.compile(cache=str(partial))
            os.replace(partial, cached)

    def predict(self, matrix: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.asarray(self.model.predict(matrix, n_jobs=1), dtype=np.float64)


def digest(model_text: str) -> str:
    return hashlib.sha256(model_text.encode()).hexdigest()[:20]


def compiled_available() -> bool:
    return importlib.util.find_spec("lleaves") is not None


def compiled_cache(model_text: str, cache_dir: Path = CACHE_DIR) -> Path:
    """Where this host keeps the model's object code (it is specific to the CPU)."""
    import llvmlite.binding as llvm  # type: ignore[import-untyped, import-not-found, unused-ignore]

    llvm.initialize_native_target()
    try:
        features = llvm.get_host_cpu_features().flatten()
    except RuntimeError:
        features = ""
    cpu = f"{llvm.get_host_cpu_name()}-{hashlib.sha256(features.encode()).hexdigest()[:8]}"
    return cache_dir / f"{digest(model_text)}-{cpu}.o"


def equal(got: npt.NDArray[np.float64], expected: npt.NDArray[np.float64]) -> bool:
    return bool(np.allclose(got, expected, rtol=RTOL, atol=ATOL, equal_nan=True))


_LOADED: dict[tuple[str, str], Evaluator] = {}  # per Python worker: (kind, digest) -> model


def evaluator(kind: str, model_text: str) -> Evaluator:
    """The model loaded (or compiled) once per process."""
    key = (kind, digest(model_text))
    if key not in _LOADED:
        _LOADED[key] = (
            CompiledEvaluator(model_text) if kind == "compiled" else NativeEvaluator(model_text)
        )
    return _LOADED[key]


def predict_batches(
    model_text: Callable[[], str],
    columns: Sequence[str],
    kind: str,
    on_batch: Callable[[int, bool], None] = lambda rows, mismatch: None,
) -> Callable[[Iterable[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The mapInPandas function: each batch plus ``prediction`` and ``predictor``.

    ``model_text`` is called in the worker (a broadcast's value); a compiled evaluator is
    checked against LightGBM on the first CHECK_ROWS rows of a task and replaced by it when
    they differ (``on_batch(rows, mismatch)`` is told)."""
    from models.fit import to_matrix

    names = list(columns)

    def run(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        text = model_text()
        model = evaluator(kind, text)
        checked = kind != "compiled"
        for batch in batches:
            matrix = to_matrix(batch, names)
            values = model.predict(matrix)
            mismatch = False
            if not checked and len(batch):
                checked = True
                native = evaluator("native", text)
                if not equal(values[:CHECK_ROWS], native.predict(matrix[:CHECK_ROWS])):
                    mismatch, model = True, native
                    values = native.predict(matrix)
            on_batch(len(batch), mismatch)
            yield batch.assign(prediction=values, predictor=model.kind)

    return run


def definition_hash(view: FeatureView) -> str:
    return hashlib.sha256(view.model_dump_json().encode()).hexdigest()[:12]


def window_end(view: FeatureView, t_ms: Column) -> Column:
    """E(t) of the contract (features/contract.window_end_at) as a Spark timestamp."""
    from pyspark.sql import functions as sf

    shifted = t_ms - sf.lit(lateness_ms(view))
    return sf.timestamp_millis(shifted - sf.pmod(shifted, sf.lit(view.slide_ms)))


def lineage(views: Sequence[FeatureView], t_ms: Column) -> Column:
    """The ``feature_views`` column: per view read, its definition hash, lateness and E(t)."""
    from pyspark.sql import functions as sf

    items = [
        sf.struct(
            sf.lit(v.name).alias("view"),
            sf.lit(definition_hash(v)).alias("definition"),
            sf.lit(lateness_ms(v)).cast("bigint").alias("lateness_ms"),
            window_end(v, t_ms).alias("window_end"),
        )
        for v in views
    ]
    element = "struct<view:string,definition:string,lateness_ms:bigint,window_end:timestamp>"
    return sf.array(*items) if items else sf.array().cast(f"array<{element}>")


def read_input(
    spark: SparkSession,
    path: str,
    service: FeatureService,
    request: Sequence[str],
    input_format: str = "auto",
) -> tuple[DataFrame, int]:
    """The input with join keys as strings, ``event_timestamp`` as a timestamp and request
    features in their declared types; its row count. ScoreInputError names the first column
    with a problem and how many rows have it."""
    from pyspark.errors import AnalysisException
    from pyspark.sql import functions as sf
    from pyspark.sql.types import LongType, NumericType, StringType, TimestampType

    fmt = input_format
    if fmt == "auto":
        fmt = "csv" if path.lower().rstrip("/").endswith((".csv", ".csv.gz")) else "parquet"
    if "://" not in path and not Path(path).exists():
        raise ScoreInputError(f"input {path!r} does not exist")
    try:
        raw = (
            spark.read.option("header", True).csv(path)
            if fmt == "csv"
            else spark.read.parquet(path)
        )
    except AnalysisException as exc:
        raise ScoreInputError(f"input {path!r}: {str(exc).splitlines()[0]}") from None
    fields = {f.name: f for r in service.request for f in r.fields}
    keys = [e.join_key for e in service.entities]
    for column in [*keys, EVENT_TIMESTAMP, *request]:
        if column not in raw.columns:
            raise ScoreInputError(f"input {path!r}: column {column!r} is missing")
    for column in OUTPUT_COLUMNS:
        if column in raw.columns:
            raise ScoreConflictError(f"input {path!r}: column {column!r} is an output column")
    checks: dict[str, tuple[str, Column]] = {}
    casts: dict[str, Column] = {key: sf.col(key).cast("string") for key in keys}
    stamp = raw.schema[EVENT_TIMESTAMP].dataType
    if isinstance(stamp, TimestampType):
        casts[EVENT_TIMESTAMP] = sf.col(EVENT_TIMESTAMP)
    elif isinstance(stamp, NumericType):
        casts[EVENT_TIMESTAMP] = sf.timestamp_millis(sf.col(EVENT_TIMESTAMP).cast(LongType()))
    else:
        text = sf.col(EVENT_TIMESTAMP).cast(StringType())
        casts[EVENT_TIMESTAMP] = sf.when(
            text.rlike("^-?[0-9]+$"), sf.timestamp_millis(text.try_cast(LongType()))
        ).otherwise(text.try_cast(TimestampType()))
    for key in [*keys, EVENT_TIMESTAMP]:
        checks[key] = ("null or not readable", casts[key].isNull())
    for name in request:
        spec = fields[name]
        casts[name] = sf.col(name).try_cast(spark_type(spec.type))
        bad = casts[name].isNull() & sf.col(name).isNotNull()
        if not spec.nullable:
            bad = bad | casts[name].isNull()
        if spec.minimum is not None:
            bad = bad | (casts[name] < sf.lit(spec.minimum))
        if spec.maximum is not None:
            bad = bad | (casts[name] > sf.lit(spec.maximum))
        checks[name] = (f"null, not {spec.type} or outside its declared bounds", bad)
    frame = raw.select(*(casts.get(c, sf.col(c)).alias(c) for c in raw.columns))
    counts = raw.agg(
        sf.count(sf.lit(1)).alias("__rows"),
        *(sf.sum(sf.when(cond, 1).otherwise(0)).alias(f"__{n}") for n, (_, cond) in checks.items()),
    ).first()
    assert counts is not None
    for name, (reason, _) in checks.items():
        if counts[f"__{name}"]:
            raise ScoreInputError(
                f"input {path!r}: column {name!r}: {counts[f'__{name}']} rows are {reason}"
            )
    if not counts["__rows"]:
        raise ScoreInputError(f"input {path!r} has no rows")
    return frame, int(counts["__rows"])


@dataclass(frozen=True)
class ScoreReport:
    model: str
    version: int
    rows: int
    output: str
    predictor: str  # what the run asked the workers for
    mismatched_batches: int  # compiled batches replaced by LightGBM's numbers
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def score(
    settings: Settings,
    input_path: str,
    output_path: str,
    *,
    model: str | None = None,
    version: int | None = None,
    predictor: Predictor = "auto",
    input_format: str = "auto",
    keep_features: bool = False,
    overwrite: bool = False,
    spark: SparkSession | None = None,
    show_progress: bool = True,
) -> ScoreReport:
    """Score every input row with one model version; write parquet with lineage."""
    from pyspark.sql import functions as sf
    from pyspark.sql.types import DoubleType, StringType, StructField, StructType

    from batch.compile import epoch_ms
    from batch.retrain import input_columns
    from batch.session import spark_session
    from batch.training import training_set
    from features.registry import load_registry
    from models.errors import ModelNotFoundError
    from models.registry import ModelRegistry

    began = time.perf_counter()
    scored_at = datetime.now(UTC)
    models = ModelRegistry.from_settings(settings)
    name = model or settings.serve_models[0]
    if version is None:
        version = models.production(name)
        if version is None:
            raise ModelNotFoundError(f"model {name!r} has no production version: give --version")
    meta = models.metadata(name, version)
    text = models.model_text(name, version)
    service = load_registry(settings.definitions_module).services.get(meta.feature_service)
    if service is None:
        raise ScoreConflictError(
            f"model {name!r} v{version} reads feature service {meta.feature_service!r}, "
            "which the definitions do not declare"
        )
    columns = input_columns(meta.features, service)
    if isinstance(columns, str):
        raise ScoreConflictError(f"model {name!r} v{version} {columns}")
    groups = [ref.partition(":")[0] for ref in meta.features]
    views = [v for v in service.views if v.name in groups]
    names = {v.name for v in views}
    request = [c for g, c in zip(groups, columns, strict=True) if g not in names]
    if "://" not in output_path and Path(output_path).exists() and not overwrite:
        raise ScoreConflictError(f"output {output_path!r} exists: remove it or pass --overwrite")
    spark = spark or spark_session(settings)
    rows, total = read_input(spark, input_path, service, request, input_format)
    kind = _choose(predictor, text, total)
    if kind == "compiled":
        evaluator("compiled", text)  # compile here once: fills this host's cache, fails early
    broadcast = spark.sparkContext.broadcast(text)
    scored_rows = spark.sparkContext.accumulator(0)
    mismatches = spark.sparkContext.accumulator(0)

    def on_batch(n: int, mismatch: bool) -> None:
        scored_rows.add(n)
        mismatches.add(int(mismatch))

    features = training_set(spark, settings, service, rows)
    schema = StructType(
        [
            *features.schema.fields,
            StructField("prediction", DoubleType()),
            StructField("predictor", StringType()),
        ]
    )
    scored = features.mapInPandas(
        predict_batches(lambda: broadcast.value, columns, kind, on_batch), schema
    )
    feature_columns = [c for c in features.columns if c not in rows.columns]
    out = scored.select(
        *rows.columns,
        *(feature_columns if keep_features else []),
        "prediction",
        sf.lit(name).alias("model_name"),
        sf.lit(version).alias("model_version"),
        sf.lit(service.name).alias("feature_service"),
        lineage(views, epoch_ms(scored, EVENT_TIMESTAMP)).alias("feature_views"),
        "predictor",
        sf.lit(scored_at).alias("scored_at"),
    )
    writer = out.write.mode("overwrite" if overwrite else "errorifexists")
    _run_with_progress(lambda: writer.parquet(output_path), total, scored_rows, show_progress)
    written = spark.read.parquet(output_path).count()
    if written != total:
        raise ScoreCountError(f"{total} input rows but {written} scored rows in {output_path}")
    broadcast.unpersist()
    return ScoreReport(
        name,
        version,
        written,
        output_path,
        "lleaves" if kind == "compiled" else "lightgbm",
        int(mismatches.value),
        time.perf_counter() - began,
    )


def _choose(predictor: Predictor, model_text: str, rows: int) -> str:
    if predictor == "native":
        return "native"
    if not compiled_available():
        if predictor == "compiled":
            raise UsageError("--predictor compiled needs lleaves (pip install lleaves)")
        return "native"
    if predictor == "compiled":
        return "compiled"
    cached = compiled_cache(model_text).exists()
    return "compiled" if cached or rows >= COMPILED_MIN_ROWS else "native"


def _run_with_progress(job: Callable[[], None], total: int, done: Any, show: bool) -> None:
    """Run the Spark job; meanwhile a rich bar follows the rows scored (per finished task)."""
    from pyspark.errors import PySparkException

    failure: list[BaseException] = []

    def target() -> None:
        try:
            job()
        except BaseException as exc:  # re-raised in the caller's thread below
            failure.append(exc)

    worker = threading.Thread(target=target, name="sluice-score", daemon=True)
    worker.start()
    if show:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, transient=False) as progress:
            task = progress.add_task("score rows", total=total)
            while worker.is_alive():
                progress.update(task, completed=min(int(done.value), total))
                worker.join(0.25)
            progress.update(task, completed=min(int(done.value), total))
    worker.join()
    if failure:
        exc = failure[0]
        if isinstance(exc, PySparkException) or type(exc).__module__.startswith("py4j"):
            raise SluiceBatchError(f"the scoring job failed: {_first_line(exc)}") from exc
        raise exc


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    for line in text.splitlines():
        if "Error:" in line and not line.startswith(("  ", "\t")):
            return line.strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _replace(path: Path, data: bytes) -> None:
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    partial.write_bytes(data)
    os.replace(partial, path)


def print_score_report(console: Console, report: ScoreReport) -> None:
    fallback = (
        f"; {report.mismatched_batches} tasks fell back to lightgbm (compiled numbers differed)"
        if report.mismatched_batches
        else ""
    )
    console.print(
        f"scored {report.rows} rows with {report.model} v{report.version} ({report.predictor}) "
        f"in {report.seconds:.1f} s ({report.rows_per_s:,.0f} rows/s) -> {report.output}"
        f"{fallback}",
        highlight=False,
    )
