"""The OpenAPI document matches the predictor's behaviour: schemathesis generates requests from
/openapi.json (valid and invalid bodies, paths, queries, headers) against the app in process,
and every built-in check (status codes and content types documented, bodies matching their
schemas, no server error, auth enforced, ...) must hold. Bounded: a few examples per
operation, derandomized so that a run is repeatable."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Ok

from core.settings import load_settings
from examples.delivery.features import delivery_eta, delivery_eta_batch_only
from serving.app import create_app
from tests.helpers.serving import FakeProducer, FakeReader, trained_registry

EXAMPLES = 15


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root: Path = tmp_path_factory.mktemp("openapi")
    registry = trained_registry(root / "models", delivery_eta, versions=2)
    trained_registry(root / "models", delivery_eta_batch_only)
    settings = load_settings(
        models_dir=str(root / "models"),
        serve_models=["delivery_eta", "delivery_eta_batch_only"],
        prediction_log_dir=root / "log",
    )
    yield create_app(settings, reader=FakeReader(), registry=registry, producer=FakeProducer())
    # schemathesis ran the app's startup on its first request and keeps it up until exit:
    # shut it down here (the prediction log, the batchers) rather than at interpreter exit.
    from schemathesis.python.asgi import shutdown_lifespans

    shutdown_lifespans()


def test_every_operation_behaves_as_documented(app: Any) -> None:
    # Operations are walked here rather than with schemathesis' pytest fixture loader, whose
    # lazy schema reads a pytest node attribute that pytest 9 no longer has.
    api = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: dict[str, str] = {}
    operations = 0
    for result in api.get_all_operations():
        assert isinstance(result, Ok), result  # the document itself is valid
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def behaves_as_documented(case: Any) -> None:
            case.call_and_validate()

        try:
            behaves_as_documented()
        except (
            Exception,
            BaseExceptionGroup,
        ) as exc:  # every operation's failure reported, not just the first
            failures[operation.label] = f"{type(exc).__name__}: {exc}"
    assert operations >= 10  # the document lists the predictor's routes
    assert not failures, "\n\n".join(f"{label}\n{error}" for label, error in failures.items())
