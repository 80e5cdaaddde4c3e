"""A second, small domain: card payments and fraud labels (tests/integration/test_second_domain.py).

Nothing here is known to the product: `sluice` finds it through SLUICE_DEFINITIONS_MODULE only.
Two sources (``payments`` and the ``fraud_labels`` that arrive after them), one stream view (a
card's spend over 10 minutes, sliding every minute), one batch view (a merchant's payments over
an hour, every 10 minutes), request features, a label declaration and a feature service. The
domain has no ``produce`` or ``demo`` hook: its producers publish JSON to ``raw.<source>``.
"""

from __future__ import annotations

from datetime import timedelta

from features.definitions import (
    Aggregation,
    AggregationFunction,
    BatchFeatureView,
    Entity,
    FeatureService,
    FeatureView,
    RequestFeatures,
    Window,
)
from features.labels import LabelJoin, Labels
from features.schema import EventSource, Field, FieldType

S, F, B, T = FieldType.STRING, FieldType.FLOAT, FieldType.BOOL, FieldType.TIMESTAMP
Agg = AggregationFunction

PAYMENTS = EventSource(
    name="payments",
    description="A card payment at a merchant.",
    key_field="card_id",
    event_time_field="paid_at",
    fields=(
        Field(name="payment_id", type=S),
        Field(name="card_id", type=S),
        Field(name="merchant_id", type=S),
        Field(name="amount", type=F, minimum=0, maximum=100_000),
        Field(name="paid_at", type=T),
    ),
)

FRAUD_LABELS = EventSource(
    name="fraud_labels",
    description="The verdict on a payment (a chargeback or a confirmation), some time later.",
    key_field="payment_id",
    event_time_field="labelled_at",
    fields=(
        Field(name="payment_id", type=S),
        Field(name="card_id", type=S),
        Field(name="paid_at", type=T),
        Field(name="is_fraud", type=B),
        Field(name="labelled_at", type=T),
    ),
)

card = Entity(name="card", join_key="card_id", description="A payment card.")
merchant = Entity(name="merchant", join_key="merchant_id", description="A merchant.")

card_spend = FeatureView(
    name="card_spend",
    entity=card,
    source=PAYMENTS,
    description="How much a card spends right now.",
    aggregations=(
        Aggregation(function=Agg.COUNT, windows=(Window.sliding("10m", every="1m"),)),
        Aggregation(
            function=Agg.SUM, column="amount", windows=(Window.sliding("10m", every="1m"),)
        ),
    ),
    ttl=timedelta(days=1),
)

merchant_payments = BatchFeatureView(
    name="merchant_payments",
    entity=merchant,
    source=PAYMENTS,
    description="A merchant's usual payments.",
    aggregations=(
        Aggregation(function=Agg.COUNT, windows=(Window.sliding("1h", every="10m"),)),
        Aggregation(
            function=Agg.MEAN, column="amount", windows=(Window.sliding("1h", every="10m"),)
        ),
    ),
    ttl=timedelta(days=1),
)

payment_request = RequestFeatures(
    name="payment_request",
    description="Known when the payment is authorised.",
    fields=(
        Field(name="amount", type=F, minimum=0, maximum=100_000),
        Field(name="hour_of_day", type=FieldType.INT, minimum=0, maximum=23),
    ),
)

payment_fraud = FeatureService(
    name="payment_fraud",
    description="Fraud score of a payment.",
    views=(card_spend, merchant_payments),
    request=(payment_request,),
)

fraud = Labels(
    name="fraud",
    description="One label per payment with a verdict, at the time it was paid.",
    source=FRAUD_LABELS,
    label="is_fraud",
    time_field="paid_at",
    entities={"card": "card_id", "merchant": "merchant_id"},
    request={"amount": "amount", "hour_of_day": "hour(paid_at)"},
    joins=(LabelJoin(source=PAYMENTS, on="payment_id", columns=("merchant_id", "amount")),),
    services=("payment_fraud",),
)
