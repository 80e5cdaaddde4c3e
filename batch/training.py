"""Point-in-time training sets from the offline store.

A label row at time t gets, for each view of the service, the row of the window ending at
``E(t) = floor((t - lateness) / slide) * slide``: the newest window servable at t under the
availability contract (features/contract.py), which is what the predictor serves at t
(``reference.value_at``). That is an equi-join on (entity, window end), cheap in
Spark, instead of an as-of join.

Why this equals Feast's as-of join (newest row with ``servable_timestamp <= t`` within the
view's ttl; the Feast source's timestamp field is the servable time, window end + lateness):
the store has a row at every busy window end plus a closing row of empty values right after
each run of them. So the newest row servable at t is either the row at E(t) (the same row we
join), or a closing row (all empty: what we fill in), or there is none (empty too).
Two differences, both deliberate: where Feast returns nulls (no row, or only rows older than
the ttl) this returns the empty values (count 0, sum 0.0, others null) like the online path,
and label rows are never dropped or deduplicated (Feast 0.67's file store does both; see
tests/integration/test_point_in_time.py). Labels must lie in backfilled dates: a missing
partition reads as empty windows.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from batch.compile import EVENT_TIMESTAMP, epoch_ms
from batch.errors import EventSchemaError
from batch.offline_store import read_offline
from core.settings import Settings
from features.contract import lateness_ms
from features.definitions import FeatureService, empty_value

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

_LABEL_MS = "__label_ms"


def feature_column(view_name: str, feature: str) -> str:
    """The training-set column of a view's feature: ``<view>__<feature>``."""
    return f"{view_name}__{feature}"


def training_set(
    spark: SparkSession, settings: Settings, service: FeatureService, labels: DataFrame
) -> DataFrame:
    """``labels`` plus ``<view>__<feature>`` for every view feature of ``service``, in order.

    ``labels`` holds the join keys of the service's entities, ``event_timestamp`` (a timestamp,
    or epoch ms) and any label or request columns; every label row comes back once (row order
    is not kept). Request features are not looked up: they are label columns already.
    """
    from pyspark.sql import functions as sf

    _check_labels(service, labels)
    out = labels.withColumn(_LABEL_MS, epoch_ms(labels, EVENT_TIMESTAMP))
    bounds = out.agg(sf.min(_LABEL_MS).alias("lo"), sf.max(_LABEL_MS).alias("hi")).first()
    added: list[str] = []
    for view in service.views:
        slide, key, late = view.slide_ms, view.entity.join_key, lateness_ms(view)
        specs = view.features()
        end_column, key_column = f"__end_{view.name}", f"__key_{view.name}"
        out = out.withColumn(
            end_column,
            # E(t) = floor((t - lateness) / slide) * slide: the contract (features/contract.py)
            sf.timestamp_millis(
                sf.col(_LABEL_MS)
                - sf.lit(late)
                - sf.pmod(sf.col(_LABEL_MS) - sf.lit(late), sf.lit(slide))
            ),
        )
        if bounds is None or bounds["lo"] is None:  # no labels, or no label times
            offline = read_offline(spark, settings, view).limit(0)
        else:
            lo, hi = int(bounds["lo"]), int(bounds["hi"])
            first = lo - late - (lo - late) % slide
            offline = read_offline(spark, settings, view, _at(first), _at(hi + 1))
        offline = offline.select(
            sf.col(key).alias(key_column),
            sf.col(EVENT_TIMESTAMP).alias(f"{end_column}_row"),
            *(sf.col(s.name).alias(feature_column(view.name, s.name)) for s in specs),
        )
        joined = (sf.col(key).cast("string") == sf.col(key_column)) & (
            sf.col(end_column) == sf.col(f"{end_column}_row")
        )
        out = out.join(offline, joined, "left").drop(key_column, end_column, f"{end_column}_row")
        for spec in specs:
            column = feature_column(view.name, spec.name)
            empty = empty_value(spec.function)
            if empty is not None:  # count 0 and sum 0.0 where the window is empty
                out = out.withColumn(column, sf.coalesce(sf.col(column), sf.lit(empty)))
            added.append(column)
    return out.select(*labels.columns, *added)


def _check_labels(service: FeatureService, labels: DataFrame) -> None:
    present = set(labels.columns)
    for column in [EVENT_TIMESTAMP, *(e.join_key for e in service.entities)]:
        if column not in present:
            raise EventSchemaError(f"labels of service {service.name!r}", column, "missing")
    for view in service.views:
        for spec in view.features():
            if feature_column(view.name, spec.name) in present:
                raise EventSchemaError(
                    f"labels of service {service.name!r}",
                    feature_column(view.name, spec.name),
                    "clashes with a feature column of the training set",
                )


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)
