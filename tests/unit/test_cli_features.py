"""`sluice features list | describe | validate` through the real typer app (no servers)."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from core.errors import ExitCode

ENV = {"COLUMNS": "200", "SLUICE_CONFIG": ""}


@pytest.fixture
def run() -> Callable[..., object]:
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, ["features", *args], env=ENV)

    return invoke


@pytest.fixture
def module_dir(tmp_path: Path) -> Iterator[Path]:
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))


def write_module(directory: Path, body: str) -> str:
    name = f"defs_{uuid.uuid4().hex[:8]}"  # unique: importlib caches modules by name
    (directory / f"{name}.py").write_text(textwrap.dedent(body))
    return name


def test_every_command_has_help(run):
    for command in ("list", "describe", "validate", "diff", "apply", "env"):
        result = run(command, "--help")
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_list_shows_views_requests_and_services(run):
    result = run("list")
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if "│" in line}
    orders = [c.strip() for c in lines["restaurant_orders"].split("│")[1:-1]]
    assert orders == [
        "restaurant_orders",
        "stream",
        "restaurant",
        "orders",
        "5m/1m, 15m/1m, 1h/1m",
        "spark, flink",
        "2h",
    ]
    prep = [c.strip() for c in lines["restaurant_prep"].split("│")[1:-1]]
    assert prep[1] == "batch"
    assert prep[5:] == ["spark", "3d"]
    assert "request" in lines["order_request"]
    assert "service" in lines["delivery_eta"]


def test_describe_a_view_shows_features_and_lineage(run):
    result = run("describe", "restaurant_orders")
    assert result.exit_code == 0, result.output
    out = result.output
    for expected in (
        "entity: restaurant (join key restaurant_id",
        "windows (size/slide): 5m/1m, 15m/1m, 1h/1m",
        "engines: spark, flink; ttl 2h",
        "raw.orders -> ingest -> events.orders (flink)",
        "-> view restaurant_orders",
        "-> services: delivery_eta",
        "restaurant_orders/date=YYYY-MM-DD/part-*.parquet",
        "fields _ts:restaurant_orders",
    ):
        assert expected in out, expected
    features = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    assert "mean" in features["mean_subtotal_1h"]
    assert "float" in features["mean_subtotal_1h"]
    assert "subtotal" in features["mean_subtotal_1h"]
    assert "int" in features["count_5m"]
    assert "placed_at" in features  # the source's fields


def test_describe_a_batch_view_shows_derived_columns(run):
    result = run("describe", "restaurant_prep")
    assert result.exit_code == 0, result.output
    assert "derived: delivery_minutes = delivery_seconds / 60" in result.output
    assert "-> services: delivery_eta, delivery_eta_batch_only" in result.output
    assert "(flink)" not in result.output


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("delivery_eta", "order_request:distance_km"),
        ("order_request", "hour_of_day"),
        ("orders", "raw.orders -> events.orders"),
        ("zone", "views: zone_couriers"),
        ("delivery_times", "label deliveries.delivery_seconds at placed_at"),
    ],
)
def test_describe_other_definitions(run, name, expected):
    result = run("describe", name)
    assert result.exit_code == 0, result.output
    assert expected in result.output


def test_describe_an_unknown_name_lists_the_known_ones(run):
    result = run("describe", "nope")
    assert result.exit_code == ExitCode.NOT_FOUND
    assert "no definition 'nope'" in result.output
    assert "restaurant_orders" in result.output


def test_validate_the_example_with_feast(run):
    result = run("validate")
    assert result.exit_code == 0, result.output
    assert "3 views (11 features)" in result.output
    assert "Feast translation: 11 objects" in result.output


def test_validate_names_definition_and_field_of_a_broken_module(run, module_dir):
    module = write_module(
        module_dir,
        """
        from features.definitions import Aggregation, AggregationFunction, FeatureView, Window
        from examples.delivery.sources import ORDERS
        from examples.delivery.features import restaurant

        busy = FeatureView(
            name="busy",
            entity=restaurant,
            source=ORDERS,
            aggregations=(
                Aggregation(
                    function=AggregationFunction.MEAN,
                    column="no_such_column",
                    windows=(Window.sliding("5m", every="1m"),),
                ),
            ),
        )
        """,
    )
    result = run("validate", "--module", module, "--no-feast")
    assert result.exit_code == ExitCode.DEFINITION
    assert "FeatureView 'busy'" in result.output
    assert "aggregations[0].column" in result.output
    assert "unknown column 'no_such_column'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "from features.definitions import Entity\nbad = Entity(name='Bad', join_key='k')\n",
            ["Entity 'Bad'", "field 'name'", "lower_snake_case"],
        ),
        (
            "from features.definitions import Window\nw = Window(size='5 minutes', slide=60)\n",
            ["Window", "field 'size'"],
        ),
        ("import no_such_package_here\n", ["module", "import", "no_such_package_here"]),
        ("def broken(:\n", ["module", "SyntaxError"]),
    ],
    ids=["definition-error", "pydantic-error", "missing-import", "syntax-error"],
)
def test_validate_reports_every_kind_of_broken_module(run, module_dir, body, expected):
    module = write_module(module_dir, body)
    result = run("validate", "--module", module, "--no-feast")
    assert result.exit_code == ExitCode.DEFINITION, result.output
    for text in expected:
        assert text in result.output, (text, result.output)
    assert "Traceback" not in result.output


def test_validate_a_missing_module(run):
    result = run("validate", "--module", "no.such.module", "--no-feast")
    assert result.exit_code == ExitCode.DEFINITION
    assert "module 'no.such.module'" in result.output


def test_env_prints_the_variables_feature_store_yaml_reads(run):
    result = run("env")
    assert result.exit_code == 0, result.output
    assert "export SLUICE_FEAST_PROJECT=sluice" in result.output
    assert "export SLUICE_FEAST_REDIS_CONNECTION=127.0.0.1:6379,db=0" in result.output
