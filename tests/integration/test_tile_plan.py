"""The tile query's plan as Flink's planner optimizes it (streaming/tiles.py): the per-event
work runs once per view. The closed rows are a second aggregation over the tile rows; when
they read fewer columns of the tile aggregation than the tile rows do, the planner prunes a
copy of it for them and runs both over every event (plan 8 did: the copy was a tenth of the
JVM's samples on bench.stream's replay), with the same results, so only the plan shows it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from examples.delivery.features import restaurant_orders, zone_couriers
from features.definitions import FeatureView
from streaming.compile import compile_view, source_table_sql
from streaming.tiles import TABLE_CONFIG, keyed_by_shard, rowtime_column, tile_query
from tests.domains.payments import card_spend

pytestmark = [pytest.mark.integration, pytest.mark.flink]


@pytest.fixture(scope="module")
def t_env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from pyflink.table import EnvironmentSettings, TableEnvironment

    from streaming.udf import FUNCTIONS, udf_jar

    env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
    jar = udf_jar(Path(tmp_path_factory.mktemp("udf")))
    env.get_config().set("pipeline.jars", jar.resolve().as_uri())
    env.get_config().set("table.local-time-zone", "UTC")
    for key, value in TABLE_CONFIG.items():
        env.get_config().set(key, value)
    for function, java_class in FUNCTIONS.items():
        env.create_java_temporary_system_function(function, java_class)
    return env


@pytest.mark.parametrize(
    "view", [restaurant_orders, zone_couriers, card_spend], ids=lambda v: v.name
)
def test_the_tile_aggregation_runs_once_per_view(t_env: Any, view: FeatureView) -> None:
    compiled = compile_view(view)
    table = f"plan_{view.name}"
    t_env.execute_sql(
        source_table_sql(
            compiled, table, "127.0.0.1:9", {}, {0: 1}, rowtime=rowtime_column(compiled)
        )
    )
    views, query = tile_query(compiled, table)
    for statement in views:
        t_env.execute_sql(statement)
    plan = t_env.explain_sql(keyed_by_shard(compiled, query)).split("== Optimized Execution Plan")
    executed = plan[1]
    # Once per view: the tile aggregation, its decode and its source scan.
    assert executed.count("sluice_distinct_sums(") == 1, executed
    assert executed.count("TableSourceScan(") == 1, executed
    assert executed.count("sluice_event_id(") == 1, executed
    # Both aggregations are there: the tiles per entity and the closed rows per slide.
    assert executed.count("WindowAggregate(") == 3, executed  # with the read rows
