"""`sluice train | retrain | score | serve`: models from point-in-time training sets, scheduled
retraining with a gate, offline batch scoring, and the predictor."""

from __future__ import annotations

from enum import StrEnum
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
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Bind address (default: setting).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: setting).")] = None,
    allow_unauthenticated: Annotated[
        bool,
        typer.Option(
            "--allow-unauthenticated",
            help="Listen beyond loopback although /predict or /feedback need no token "
            "(SLUICE_PREDICT_TOKENS, SLUICE_FEEDBACK_TOKENS unset); logs a warning.",
        ),
    ] = False,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Server processes sharing the port (one per core pays; each has its own "
            "prediction log directory and metrics: see serving/workers.py).",
        ),
    ] = 1,
) -> None:
    """Run the predictor (FastAPI on uvicorn): /predict, /feedback, /models, /metrics, /docs."""
    from models.errors import ModelNotFoundError
    from models.registry import ModelRegistry
    from serving.auth import check_bind
    from serving.workers import serve as run_server

    s = settings()
    host = host or s.serve_host
    check_bind(host, s, allow_unauthenticated)  # before anything is loaded or bound
    models = ModelRegistry.from_settings(s)
    for name in s.serve_models:  # fail here with one clear line, not in uvicorn's startup
        if models.production(name) is None:
            raise ModelNotFoundError(
                f"model {name!r} has no production version in {s.models_dir}: run `sluice train`"
            )
    config = ctx.parent.params.get("config") if ctx.parent is not None else None
    run_server(s, host, port or s.serve_port, workers, config)


def retrain(
    service: Annotated[
        list[str] | None,
        typer.Option(
            "--service",
            help="Feature services to retrain (repeatable). Default: every service that a "
            "Labels declaration names.",
        ),
    ] = None,
    period: Annotated[
        str, typer.Option(help="Label times to use, back from --until: 90m, 12h, 7d, 2w.")
    ] = "7d",
    until: Annotated[
        str | None,
        typer.Option(
            help="End of the period (ISO time, exclusive). Default: the newest label time "
            "rounded up to the next whole hour."
        ),
    ] = None,
    eval_fraction: Annotated[
        float,
        typer.Option(min=0.01, max=0.9, help="Newest share of the period's labels held out."),
    ] = 0.2,
    margin: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=0.99,
            help="Relative MAE improvement the challenger needs (default: setting "
            "retrain_margin, 0.02).",
        ),
    ] = None,
    rounds: Annotated[int, typer.Option(min=1, help="LightGBM boosting rounds.")] = 200,
    warm_start: Annotated[
        bool,
        typer.Option(
            "--warm-start/--no-warm-start",
            help="Continue boosting from the production model when it reads the same inputs.",
        ),
    ] = True,
    force: Annotated[
        bool, typer.Option("--force", help="Decide again a period that has a decision.")
    ] = False,
) -> None:
    """Train a challenger per service on the newest labelled period; promote it only when it
    beats production by the margin and passes sanity gates; record the decision (cron-safe:
    a decided period is not decided again)."""
    from batch.retrain import parse_period, print_retrain_report
    from batch.retrain import retrain as run_retrain
    from cli.common import parse_time

    period_ms = parse_period(period)
    until_ms = parse_time(until, "--until") if until is not None else None
    report = run_retrain(
        settings(),
        service or None,
        period_ms=period_ms,
        until_ms=until_ms,
        eval_fraction=eval_fraction,
        margin=margin,
        rounds=rounds,
        warm_start=warm_start,
        force=force,
    )
    print_retrain_report(console, report)


class PredictorChoice(StrEnum):
    AUTO = "auto"
    NATIVE = "native"
    COMPILED = "compiled"


class InputFormat(StrEnum):
    AUTO = "auto"
    PARQUET = "parquet"
    CSV = "csv"


def score(
    input_path: Annotated[
        str,
        typer.Argument(
            metavar="INPUT",
            help="Parquet or CSV of entity rows: join keys, event_timestamp, request features.",
        ),
    ],
    output_path: Annotated[
        str, typer.Argument(metavar="OUTPUT", help="Parquet directory to write.")
    ],
    model: Annotated[
        str | None, typer.Option(help="Model name (default: the first of serve_models).")
    ] = None,
    version: Annotated[
        int | None, typer.Option(min=1, help="Model version (default: production).")
    ] = None,
    predictor: Annotated[
        PredictorChoice,
        typer.Option(
            case_sensitive=False,
            help="Model evaluation: LightGBM (native), lleaves-compiled, or auto (compiled "
            "when installed and the model is cached on this host or the input is large).",
        ),
    ] = PredictorChoice.AUTO,
    input_format: Annotated[
        InputFormat,
        typer.Option("--format", case_sensitive=False, help="Input format (auto: by suffix)."),
    ] = InputFormat.AUTO,
    features: Annotated[
        bool, typer.Option("--features", help="Also write the feature values used.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT.")] = False,
) -> None:
    """Offline batch scoring with Spark: point-in-time features (the training and serving
    contract) -> predictions of one model version -> parquet with lineage."""
    from batch.score import print_score_report
    from batch.score import score as run_score

    report = run_score(
        settings(),
        input_path,
        output_path,
        model=model,
        version=version,
        predictor=predictor.value,
        input_format=input_format.value,
        keep_features=features,
        overwrite=overwrite,
        show_progress=console.is_terminal,
    )
    print_score_report(console, report)
