"""`sluice train`: labels from the event history, point-in-time features from the offline store
(Spark, batch.training), LightGBM per feature service (models.fit), models to the registry.

Labels: one row per delivery in the history (settings.history_dir): label delivery_seconds,
event_timestamp = placed_at (features must be those known when the order was placed),
entities restaurant_id and zone_id, request features distance_km, hour_of_day (UTC hour of
placed_at) and items, joined from the orders history by order_id. Deliveries whose order is not
in the history have no items and are left out (counted in the report). The offline store must
hold backfilled features for the label dates (`sluice backfill`); a missing day reads as empty
windows, so the report shows how many rows found any streaming value.

Every service is trained on the same labels and evaluated on the same later time slice, so their
MAEs compare directly: delivery_eta against delivery_eta_batch_only shows what the streaming
features add.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow.compute as pc
from rich.console import Console
from rich.table import Table

from batch.errors import TrainError
from core.settings import Settings
from events.history import read_history
from examples.delivery.sources import DELIVERIES, ORDERS
from features.definitions import FeatureService

if TYPE_CHECKING:
    from models.registry import ModelMetadata

LABEL = "delivery_seconds"
DEFAULT_SERVICES = ("delivery_eta", "delivery_eta_batch_only")


@dataclass(frozen=True)
class TrainedVersion:
    metadata: ModelMetadata
    promoted: bool
    rows_with_features: int  # training rows with at least one non-empty view feature


@dataclass(frozen=True)
class TrainReport:
    labels: int
    dropped_no_order: int
    models: list[TrainedVersion]


def build_labels(settings: Settings) -> tuple[pd.DataFrame, int]:
    """Label rows from the deliveries and orders history; also how many lacked their order."""
    deliveries = read_history(settings.history_dir, DELIVERIES)
    if deliveries.num_rows == 0:
        raise TrainError(
            f"no deliveries in {settings.history_dir}: run `sluice produce --history "
            f"{settings.history_dir}` (or `sluice demo`) first"
        )
    orders = read_history(settings.history_dir, ORDERS).select(["order_id", "items"])
    placed = deliveries.column("placed_at")
    labels = pd.DataFrame(
        {
            "order_id": deliveries.column("order_id").to_pylist(),
            "restaurant_id": deliveries.column("restaurant_id").to_pylist(),
            "zone_id": deliveries.column("zone_id").to_pylist(),
            "distance_km": deliveries.column("distance_km").to_numpy(),
            "hour_of_day": pc.hour(placed).to_numpy().astype("int64"),  # UTC, like placed_at
            LABEL: deliveries.column(LABEL).to_numpy(),
            "event_timestamp": pc.cast(placed, "int64").to_numpy(),  # epoch ms
        }
    )
    items = pd.DataFrame(
        {
            "order_id": orders.column("order_id").to_pylist(),
            "items": orders.column("items").to_numpy(),
        }
    ).drop_duplicates("order_id")
    joined = labels.merge(items, on="order_id", how="inner")
    return joined, len(labels) - len(joined)


def train_models(
    settings: Settings,
    services: Sequence[str] = DEFAULT_SERVICES,
    *,
    eval_fraction: float = 0.2,
    rounds: int = 200,
    promote: bool | None = None,
) -> TrainReport:
    """Train one model per service; promote=None promotes only where no production exists."""
    from batch.session import spark_session
    from batch.training import training_set
    from features.registry import load_registry
    from models.errors import ModelError
    from models.fit import fit
    from models.registry import ModelRegistry

    registry = load_registry(settings.definitions_module)
    unknown = sorted(set(services) - set(registry.services))
    if unknown:
        raise TrainError(f"unknown feature service(s): {', '.join(unknown)}")
    labels, dropped = build_labels(settings)
    spark = spark_session(settings)
    spark_labels = spark.createDataFrame(labels).cache()
    models = ModelRegistry(settings.models_dir)
    trained: list[TrainedVersion] = []
    try:
        for name in services:
            service = registry.services[name]
            frame = training_set(spark, settings, service, spark_labels).toPandas()
            try:
                model = fit(
                    frame,
                    service,
                    label=LABEL,
                    eval_fraction=eval_fraction,
                    rounds=rounds,
                    notes={"labels": len(labels), "dropped_no_order": dropped},
                )
                stored = models.save(model.model_text, model.metadata)
                do_promote = promote if promote is not None else models.production(name) is None
                if do_promote:
                    models.promote(name, stored.version)
            except ModelError as exc:
                raise TrainError(f"service {name!r}: {exc}") from exc
            trained.append(TrainedVersion(stored, do_promote, _rows_with_features(frame, service)))
    finally:
        spark_labels.unpersist()
    return TrainReport(len(labels), dropped, trained)


def _rows_with_features(frame: pd.DataFrame, service: FeatureService) -> int:
    """Rows where some view feature is non-empty (not null, not 0): the offline store had data."""
    columns = [f"{v.name}__{s.name}" for v in service.views for s in v.features()]
    if not columns:
        return len(frame)
    present = frame[columns].fillna(0).ne(0).any(axis=1)
    return int(present.sum())


def print_train_report(console: Console, report: TrainReport, models_dir: str) -> None:
    """The models trained, their MAE against the mean baseline, and what streaming adds."""
    table = Table("model", "version", "MAE (s)", "mean baseline MAE (s)", "train/eval rows")
    table.add_column("rows with features")
    table.add_column("production")
    for model in report.models:
        meta, metrics = model.metadata, model.metadata.metrics
        table.add_row(
            meta.name,
            str(meta.version),
            f"{metrics.mae:.1f}",
            f"{metrics.mae_mean_baseline:.1f}",
            f"{metrics.rows_train}/{metrics.rows_eval}",
            str(model.rows_with_features),
            "yes" if model.promoted else "no",
        )
    console.print(table)
    console.print(
        f"{report.labels} labels ({report.dropped_no_order} deliveries without their order "
        f"left out); registry: {models_dir}"
    )
    by_name = {m.metadata.name: m.metadata.metrics.mae for m in report.models}
    if {"delivery_eta", "delivery_eta_batch_only"} <= set(by_name):
        gain = 1 - by_name["delivery_eta"] / by_name["delivery_eta_batch_only"]
        console.print(f"streaming features cut the MAE by {gain:.1%} against batch-only")
