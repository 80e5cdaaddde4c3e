"""Label declarations (features/labels.py): checks at definition and at registry load, label rows
from history (batch.train.build_labels, no Spark), which services `sluice train` picks, and the
domain hooks of the CLI."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from batch.errors import TrainError
from batch.train import build_labels, plan
from cli.main import app
from core.errors import ExitCode
from core.settings import load_settings
from events.history import SourceEvent, write_history
from examples.delivery import features as delivery
from examples.delivery.sources import DELIVERIES, ORDERS
from features.definitions import FeatureService
from features.errors import FeatureDefinitionError
from features.expressions import compile_python, infer_type, parse, to_sql
from features.labels import LabelJoin, Labels
from features.registry import domain_hook, load_registry
from features.schema import FieldType
from tests.domains import payments

HOUR_MS = 3_600_000


def labels(**overrides: Any) -> Labels:
    spec: dict[str, Any] = {
        "name": "fraud",
        "source": payments.FRAUD_LABELS,
        "label": "is_fraud",
        "time_field": "paid_at",
        "entities": {"card": "card_id", "merchant": "merchant_id"},
        "request": {"amount": "amount", "hour_of_day": "hour(paid_at)"},
        "joins": (
            LabelJoin(source=payments.PAYMENTS, on="payment_id", columns=("merchant_id", "amount")),
        ),
        "services": ("payment_fraud",),
    }
    return Labels(**(spec | overrides))


def test_the_examples_declare_their_labels():
    registry = load_registry("examples.delivery.features")
    assert registry.labels == {"delivery_times": delivery.delivery_times}
    assert registry.labels_of("delivery_eta") is delivery.delivery_times
    assert registry.labels_of("nope") is None
    assert registry.names()["delivery_times"] == "labels"
    assert registry.get("delivery_times") is delivery.delivery_times
    domain = load_registry("tests.domains.payments")
    assert set(domain.sources) == {"payments", "fraud_labels"}  # the label source comes along
    assert domain.labels_of("payment_fraud") == payments.fraud


def test_time_field_defaults_to_the_event_time():
    assert labels(time_field="").time_field == "labelled_at"


@pytest.mark.parametrize(
    ("overrides", "field", "reason"),
    [
        ({"name": "Fraud"}, "name", "lower_snake_case"),
        ({"label": "nope"}, "label", "not a field of fraud_labels"),
        ({"label": "card_id"}, "label", "int, float or bool"),
        ({"time_field": "card_id"}, "time_field", "non-nullable timestamp"),
        ({"entities": {}}, "entities", "at least one entity"),
        ({"entities": {"card": "nope"}}, "entities.card", "unknown column 'nope'"),
        ({"entities": {"card": "paid_at"}}, "entities.card", "non-nullable strings"),
        ({"request": {"amount": "amount +"}}, "request.amount", "unexpected end"),
        ({"request": {"amount": "hour(card_id)"}}, "request.amount", "needs a timestamp"),
        ({"request": {"x": "coalesce(is_fraud, false)"}}, "request.x", "reads the label"),
        ({"request": {"is_fraud": "amount"}}, "request.is_fraud", "column of the label rows"),
        ({"services": ()}, "services", "at least one feature service"),
        ({"services": ("a", "a")}, "services", "'a' appears twice"),
        (
            {
                "joins": (
                    LabelJoin(source=payments.PAYMENTS, on="merchant_id", columns=("amount",)),
                )
            },
            "joins[0].on",
            "not a column of fraud_labels",
        ),
        (
            {
                "joins": (
                    LabelJoin(source=payments.PAYMENTS, on="payment_id", columns=("card_id",)),
                )
            },
            "joins[0].columns",
            "column of the label rows already",
        ),
        (
            {"joins": (LabelJoin(source=payments.PAYMENTS, on="payment_id", columns=("x",)),)},
            "joins[0].columns",
            "'x' is not a field of payments",
        ),
        (
            {"joins": (LabelJoin(source=ORDERS, on="payment_id", columns=("items",)),)},
            "joins[0].on",
            "not a field of orders",
        ),
    ],
)
def test_definition_errors_name_the_declaration_and_field(overrides, field, reason):
    with pytest.raises(FeatureDefinitionError, match=reason) as caught:
        labels(**overrides)
    assert (caught.value.kind, caught.value.field) == ("Labels", field)
    assert "Labels 'fraud" in str(caught.value) or "Labels 'Fraud'" in str(caught.value)


@pytest.fixture
def module() -> Iterator[types.ModuleType]:
    """A throwaway definitions module holding the payments domain; tests swap its labels."""
    name = "tests_labels_domain"
    mod = types.ModuleType(name)
    for attr in ("card_spend", "merchant_payments", "payment_fraud", "payment_request"):
        setattr(mod, attr, getattr(payments, attr))
    sys.modules[name] = mod
    try:
        yield mod
    finally:
        del sys.modules[name]


@pytest.mark.parametrize(
    ("overrides", "field", "reason"),
    [
        ({"services": ("nope",)}, "services", "unknown feature service 'nope'"),
        ({"entities": {"card": "card_id", "shop": "merchant_id"}}, "entities.shop", "unknown"),
        ({"entities": {"card": "card_id"}}, "entities", "reads entity 'merchant'"),
        ({"request": {"amount": "amount"}}, "request", "payment_request:hour_of_day"),
        (
            {"request": {"amount": "amount", "hour_of_day": "amount"}},
            "request.hour_of_day",
            "is float",
        ),
        (
            {"request": {"amount": "amount", "hour_of_day": "hour(paid_at)", "card_id": "amount"}},
            "entities.card",
            "clashes with request feature 'card_id'",
        ),
    ],
)
def test_registry_checks_labels_against_entities_and_services(module, overrides, field, reason):
    module.fraud = labels(**overrides)
    with pytest.raises(FeatureDefinitionError, match=reason) as caught:
        load_registry(module.__name__)
    assert (caught.value.kind, caught.value.name, caught.value.field) == ("Labels", "fraud", field)


def test_a_service_trains_on_one_label_declaration(module):
    module.fraud = labels()
    module.fraud_again = labels(name="fraud_again")
    with pytest.raises(FeatureDefinitionError, match="trained on labels 'fraud' already"):
        load_registry(module.__name__)


def test_an_int_expression_may_feed_a_float_request_feature(module):
    module.fraud = labels(request={"amount": "hour(paid_at)", "hour_of_day": "hour(paid_at)"})
    assert load_registry(module.__name__).labels["fraud"] == module.fraud


def test_hour_is_the_utc_hour_of_a_timestamp():
    expr = parse("hour(paid_at)")
    assert infer_type(expr, {"paid_at": FieldType.TIMESTAMP}) is FieldType.INT
    assert to_sql(expr) == "HOUR(`paid_at`)"
    hour = compile_python(expr)
    assert hour({"paid_at": 1_794_308_400_000 + 5 * HOUR_MS}) == (11 + 5) % 24
    assert hour({"paid_at": None}) is None


def _payment(i: int, t: int) -> SourceEvent:
    payload: dict[str, Any] = {
        "payment_id": f"p{i}",
        "card_id": f"c{i % 3}",
        "merchant_id": f"m{i % 2}",
        "amount": 10.0 * i,
        "paid_at": t,
    }
    return SourceEvent("payments", payload["card_id"], t, payload)


def _verdict(i: int, t: int) -> SourceEvent:
    payload: dict[str, Any] = {
        "payment_id": f"p{i}",
        "card_id": f"c{i % 3}",
        "paid_at": t,
        "is_fraud": i % 4 == 0,
        "labelled_at": t + 600_000,
    }
    return SourceEvent("fraud_labels", payload["payment_id"], t + 600_000, payload)


def test_label_rows_join_other_histories_and_count_what_they_drop(tmp_path: Path):
    start = 1_794_308_400_000  # 2026-11-10 11:00 UTC
    times = [start + i * 20 * 60_000 for i in range(6)]  # 11:00 .. 12:40
    events = [_payment(i, t) for i, t in enumerate(times[:5])]  # p5 has no payment
    events += [_verdict(i, t) for i, t in enumerate(times)]
    write_history(events, tmp_path, [payments.PAYMENTS, payments.FRAUD_LABELS])
    registry = load_registry("tests.domains.payments")
    rows = build_labels(load_settings(history_dir=tmp_path), registry, registry.labels["fraud"])
    assert rows.read == 6
    assert rows.dropped == {"payments by payment_id": 1}
    frame = rows.frame.sort_values("event_timestamp")
    assert list(frame.columns) == [
        "card_id",
        "merchant_id",
        "amount",
        "hour_of_day",
        "is_fraud",
        "event_timestamp",
    ]
    assert frame["event_timestamp"].tolist() == times[:5]
    assert frame["hour_of_day"].tolist() == [11, 11, 11, 12, 12]
    assert frame["merchant_id"].tolist() == ["m0", "m1", "m0", "m1", "m0"]
    assert frame["amount"].tolist() == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert frame["is_fraud"].tolist() == [True, False, False, False, True]


def test_delivery_label_rows_match_the_old_hand_built_ones(tmp_path: Path):
    t = 1_794_308_400_000
    order = {
        "order_id": "o1",
        "restaurant_id": "r1",
        "zone_id": "z1",
        "items": 3,
        "subtotal": 20.0,
        "distance_km": 2.5,
        "placed_at": t,
    }
    delivered = {
        "order_id": "o1",
        "restaurant_id": "r1",
        "zone_id": "z1",
        "courier_id": "k1",
        "distance_km": 2.5,
        "prep_seconds": 300.0,
        "delivery_seconds": 1500.0,
        "placed_at": t,
        "delivered_at": t + 1_500_000,
    }
    write_history(
        [SourceEvent("orders", "r1", t, order), SourceEvent("deliveries", "o1", t, delivered)],
        tmp_path,
        [ORDERS, DELIVERIES],
    )
    registry = load_registry("examples.delivery.features")
    rows = build_labels(load_settings(history_dir=tmp_path), registry, delivery.delivery_times)
    assert rows.frame.to_dict("records") == [
        {
            "restaurant_id": "r1",
            "zone_id": "z1",
            "distance_km": 2.5,
            "hour_of_day": 11,
            "items": 3,
            "delivery_seconds": 1500.0,
            "event_timestamp": t,
        }
    ]


def test_no_history_is_a_clear_error(tmp_path: Path):
    registry = load_registry("tests.domains.payments")
    with pytest.raises(TrainError, match="no fraud_labels events in"):
        build_labels(load_settings(history_dir=tmp_path), registry, payments.fraud)


def test_train_plans_every_declared_service_or_the_named_ones(module):
    registry = load_registry("examples.delivery.features")
    everything = plan(registry, None)
    assert {k: [s.name for s in v] for k, v in everything.items()} == {
        "delivery_times": ["delivery_eta", "delivery_eta_batch_only"]
    }
    assert [s.name for s in plan(registry, ["delivery_eta"])["delivery_times"]] == ["delivery_eta"]
    with pytest.raises(TrainError, match="unknown feature service"):
        plan(registry, ["nope"])
    module.other = FeatureService(name="other", views=(payments.card_spend,))
    module.fraud = labels()
    with pytest.raises(TrainError, match="'other' is named by no Labels"):
        plan(load_registry(module.__name__), ["other"])
    bare = types.ModuleType("tests_labels_bare")
    setattr(bare, "payment_fraud", payments.payment_fraud)  # noqa: B010
    sys.modules[bare.__name__] = bare
    try:
        with pytest.raises(TrainError, match="declares no Labels"):
            plan(load_registry(bare.__name__), None)
    finally:
        del sys.modules[bare.__name__]


def test_domain_hooks_are_found_by_name():
    assert callable(domain_hook("examples.delivery.features", "produce"))
    assert callable(domain_hook("examples.delivery.features", "demo"))
    assert domain_hook("tests.domains.payments", "produce") is None
    with pytest.raises(FeatureDefinitionError, match="No module named"):
        domain_hook("tests.domains.nope", "produce")


@pytest.mark.parametrize("command", [["produce", "--no-kafka"], ["demo"]])
def test_a_domain_without_a_hook_says_so_in_one_line(command):
    env = {"COLUMNS": "200", "SLUICE_CONFIG": "", "SLUICE_DEFINITIONS_MODULE": payments.__name__}
    result = CliRunner().invoke(app, command, env=env)
    assert result.exit_code == ExitCode.NOT_FOUND, result.output
    assert f"the domain {payments.__name__} defines no `{command[0]}` hook" in result.output
    assert "Traceback" not in result.output
