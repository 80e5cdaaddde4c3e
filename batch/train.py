"""`sluice train`: labels from the event history, point-in-time features from the offline store
(Spark, batch.training), LightGBM per feature service (models.fit), models to the registry.

What to learn is declared in the definitions module (features/labels.py): a ``Labels``
declaration names the source whose history (settings.history_dir) holds one label row per
event, the label column, the time features must be known at, the entity key columns, the
request features (columns or expressions), columns joined from other sources' histories, and
the feature services trained on it. ``build_labels`` turns that into a frame of the entity join
keys, the request features, the label and ``event_timestamp`` (epoch ms); label rows that a
join finds no match for are left out and counted per join. The offline store must hold
backfilled features for the label dates (`sluice backfill`); a missing day reads as empty
windows, so the report shows how many rows found any view value.

Every service of one declaration is trained on the same label rows and evaluated on the same
later time slice, so their MAEs compare directly; where one service reads every view of
another and more, the report says how much the extra views cut the error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.table import Table

from batch.errors import TrainError
from core.settings import Settings
from events.history import read_history
from features.definitions import FeatureService
from features.expressions import Column, compile_python, parse
from features.labels import EVENT_TIMESTAMP, Labels, expression_columns
from features.registry import Registry
from features.schema import EventSource, FieldType

if TYPE_CHECKING:
    from models.registry import ModelMetadata


@dataclass(frozen=True)
class LabelRows:
    """The label rows of one declaration, and what the joins left out."""

    labels: Labels
    frame: pd.DataFrame  # entity join keys, request features, the label, event_timestamp
    read: int  # events of the label source in the history
    dropped: dict[str, int] = field(default_factory=dict)  # "<source> by <column>" -> rows


@dataclass(frozen=True)
class TrainedVersion:
    metadata: ModelMetadata
    promoted: bool
    rows_with_features: int  # training rows with at least one non-empty view feature
    service: FeatureService
    labels: str  # the label declaration it was trained on


@dataclass(frozen=True)
class TrainReport:
    label_rows: list[LabelRows]
    models: list[TrainedVersion]

    @property
    def labels(self) -> int:
        return sum(len(rows.frame) for rows in self.label_rows)


def _history_frame(settings: Settings, source: EventSource, columns: Sequence[str]) -> pd.DataFrame:
    """Columns of a source's history; timestamps as epoch milliseconds (int64)."""
    table = read_history(settings.history_dir, source).select(list(dict.fromkeys(columns)))
    arrays = {
        name: pc.cast(table.column(name), pa.int64())
        if source.field(name).type is FieldType.TIMESTAMP
        else table.column(name)
        for name in table.column_names
    }
    frame: pd.DataFrame = pa.table(arrays).to_pandas()
    return frame


def build_labels(settings: Settings, registry: Registry, labels: Labels) -> LabelRows:
    """Label rows from the history of ``labels.source``, with its joins and request features."""
    source = labels.source
    frame = _history_frame(settings, source, source.field_names)
    if frame.empty:
        raise TrainError(
            f"labels {labels.name!r}: no {source.name} events in {settings.history_dir}: "
            "write the history first (`sluice produce --history DIR`, or `sluice demo`)"
        )
    read = len(frame)
    dropped: dict[str, int] = {}
    for join in labels.joins:
        other = _history_frame(settings, join.source, [join.on, *join.columns])
        other = other[other[join.on].notna()].drop_duplicates(join.on)
        before = len(frame)
        frame = frame[frame[join.on].notna()].merge(other, on=join.on, how="inner")
        dropped[join.description] = before - len(frame)
    out = pd.DataFrame(index=frame.index)
    for name, column in labels.entities.items():
        out[registry.entities[name].join_key] = frame[column]
    for name, text in labels.request.items():
        out[name] = _evaluate(frame, text)
    out[labels.label] = frame[labels.label]
    out[EVENT_TIMESTAMP] = frame[labels.time_field].astype("int64")
    return LabelRows(labels, out.reset_index(drop=True), read, dropped)


def _evaluate(frame: pd.DataFrame, text: str) -> pd.Series[Any]:
    """A request feature: a column as it is, or an expression row by row (SQL null rules)."""
    expr = parse(text)
    if isinstance(expr, Column):
        return frame[expr.name]
    evaluate = compile_python(expr)
    used = frame[sorted(expression_columns(expr))]
    values = used.astype(object).where(used.notna(), None)
    names = list(used.columns)
    return pd.Series(
        [evaluate(dict(zip(names, row, strict=True))) for row in values.itertuples(index=False)],
        index=frame.index,
        dtype=object,
    ).infer_objects()


def plan(registry: Registry, services: Sequence[str] | None) -> dict[str, list[FeatureService]]:
    """Services to train grouped by label declaration: the named ones, or every declared one."""
    if not registry.labels:
        raise TrainError(
            f"{registry.module} declares no Labels (features/labels.py): nothing to train on"
        )
    if not services:
        return {
            name: [registry.services[s] for s in labels.services]
            for name, labels in registry.labels.items()
        }
    unknown = sorted(set(services) - set(registry.services))
    if unknown:
        raise TrainError(f"unknown feature service(s): {', '.join(unknown)}")
    out: dict[str, list[FeatureService]] = {}
    for name in dict.fromkeys(services):
        labels = registry.labels_of(name)
        if labels is None:
            raise TrainError(f"service {name!r} is named by no Labels declaration: no labels")
        out.setdefault(labels.name, []).append(registry.services[name])
    return out


def train_models(
    settings: Settings,
    services: Sequence[str] | None = None,
    *,
    eval_fraction: float = 0.2,
    rounds: int = 200,
    promote: bool | None = None,
) -> TrainReport:
    """Train one model per service; promote=None promotes only where no production exists.

    ``services`` None trains every service of every label declaration.
    """
    from batch.session import spark_session
    from batch.training import training_set
    from features.registry import load_registry
    from models.errors import ModelError
    from models.fit import fit
    from models.registry import ModelRegistry

    registry = load_registry(settings.definitions_module)
    todo = plan(registry, services)
    spark = spark_session(settings)
    models = ModelRegistry.from_settings(settings)
    all_rows: list[LabelRows] = []
    trained: list[TrainedVersion] = []
    for labels_name, group in todo.items():
        rows = build_labels(settings, registry, registry.labels[labels_name])
        all_rows.append(rows)
        spark_labels = spark.createDataFrame(rows.frame).cache()
        try:
            for service in group:
                frame = training_set(spark, settings, service, spark_labels).toPandas()
                try:
                    model = fit(
                        frame,
                        service,
                        label=rows.labels.label,
                        eval_fraction=eval_fraction,
                        rounds=rounds,
                        notes={"labels": labels_name, "rows": len(rows.frame)}
                        | {"dropped": rows.dropped},
                    )
                    stored = models.save(model.model_text, model.metadata)
                    do_promote = (
                        promote if promote is not None else models.production(service.name) is None
                    )
                    if do_promote:
                        models.promote(service.name, stored.version)
                except ModelError as exc:
                    raise TrainError(f"service {service.name!r}: {exc}") from exc
                with_features = _rows_with_features(frame, service)
                trained.append(
                    TrainedVersion(stored, do_promote, with_features, service, labels_name)
                )
        finally:
            spark_labels.unpersist()
    return TrainReport(all_rows, trained)


def _rows_with_features(frame: pd.DataFrame, service: FeatureService) -> int:
    """Rows where some view feature is non-empty (not null, not 0): the offline store had data."""
    columns = [f"{v.name}__{s.name}" for v in service.views for s in v.features()]
    if not columns:
        return len(frame)
    present = frame[columns].fillna(0).ne(0).any(axis=1)
    return int(present.sum())


def print_train_report(console: Console, report: TrainReport, models_dir: str) -> None:
    """The models trained, their MAE against the mean baseline, and what extra views add."""
    table = Table("model", "version", "MAE", "mean baseline MAE", "train/eval rows")
    table.add_column("rows with features")
    table.add_column("production")
    for model in report.models:
        meta, metrics = model.metadata, model.metadata.metrics
        table.add_row(
            meta.name,
            str(meta.version),
            f"{metrics.mae:.4g}",
            f"{metrics.mae_mean_baseline:.4g}",
            f"{metrics.rows_train}/{metrics.rows_eval}",
            str(model.rows_with_features),
            "yes" if model.promoted else "no",
        )
    console.print(table)
    for rows in report.label_rows:
        left_out = ", ".join(f"{n} without a match in {j}" for j, n in rows.dropped.items())
        console.print(
            f"labels {rows.labels.name}: {len(rows.frame)} rows from {rows.read} "
            f"{rows.labels.source.name} events ({left_out or 'no joins'}); registry: {models_dir}",
            highlight=False,
        )
    for line in view_gains(report):
        console.print(line, highlight=False)


def view_gains(report: TrainReport) -> list[str]:
    """For two services trained on the same labels where one reads every view of the other and
    more: how much the extra views cut the MAE (e.g. streaming views against batch only)."""
    lines = []
    for model in report.models:
        for base in report.models:
            views = {v.name for v in model.service.views}
            base_views = {v.name for v in base.service.views}
            base_mae = base.metadata.metrics.mae
            if model.labels == base.labels and base_views < views and base_mae > 0:
                gain = 1 - model.metadata.metrics.mae / base_mae
                extra = ", ".join(sorted(views - base_views))
                lines.append(
                    f"{model.service.name} cuts the MAE by {gain:.1%} against "
                    f"{base.service.name} (adds {extra})"
                )
    return lines
