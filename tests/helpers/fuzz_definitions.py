"""A definitions module for ingest fault tests: the example's orders source on topics of its
own (fuzz.raw.orders -> fuzz.events.orders), so a `sluice ingest` subprocess sees only the
records its test wrote."""

from __future__ import annotations

from examples.delivery import sources as examples

# Module attributes are definitions (features/registry.py): the original stays in `examples`.
orders = examples.ORDERS.model_copy(
    update={"topic": "fuzz.events.orders", "raw_topic": "fuzz.raw.orders"}
)
