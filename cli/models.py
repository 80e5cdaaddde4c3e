"""`sluice train | serve`: models from point-in-time training sets, and the predictor."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import console, settings


def train(
    service: Annotated[
        list[str] | None,
        typer.Option(
            "--service",
            help="Feature services to train (repeatable). Default: every service that a "
            "Labels declaration of the definitions module names.",
        ),
    ] = None,
    eval_fraction: Annotated[
        float, typer.Option(min=0.01, max=0.9, help="Newest share of label times to evaluate on.")
    ] = 0.2,
    rounds: Annotated[int, typer.Option(min=1, help="LightGBM boosting rounds.")] = 200,
    promote: Annotated[
        bool | None,
        typer.Option(
            "--promote/--no-promote",
            help="Make the new versions production. Default: only where none is.",
        ),
    ] = None,
) -> None:
    """Train LightGBM models on point-in-time training sets; store them in the model registry."""
    from batch.train import print_train_report, train_models

    report = train_models(
        settings(),
        service or None,
        eval_fraction=eval_fraction,
        rounds=rounds,
        promote=promote,
    )
    print_train_report(console, report, settings().models_dir)


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: setting).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: setting).")] = None,
) -> None:
    """Run the predictor (FastAPI on uvicorn): /predict, /feedback, /models, /metrics, /docs."""
    import uvicorn

    from models.errors import ModelNotFoundError
    from models.registry import ModelRegistry
    from serving.app import create_app

    s = settings()
    models = ModelRegistry(s.models_dir)
    for name in s.serve_models:  # fail here with one clear line, not in uvicorn's startup
        if models.production(name) is None:
            raise ModelNotFoundError(
                f"model {name!r} has no production version in {s.models_dir}: run `sluice train`"
            )
    uvicorn.run(
        create_app(s),
        host=host or s.serve_host,
        port=port or s.serve_port,
        log_level="warning",
        access_log=False,
    )
