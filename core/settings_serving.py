"""The predictor's settings (`sluice serve`): a part of ``core.settings.Settings``.

Settings inherits them; they are read, validated and reported exactly as the others (the
module docstring of core/settings.py says how). They live here to keep that module to the
engines' and stores' settings: serving, its prediction log, model selection, rollout, the
availability contract, deadlines (whose Redis timeouts the stream's writers use too), access
tokens and request limits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode

from core.settings_values import TOKEN_TEXT, parse_list


class ServingSettings(BaseSettings):
    # Predictor (`sluice serve`).
    serve_host: str = "127.0.0.1"
    serve_port: int = Field(default=8000, ge=1, le=65535)
    # Models served: each needs a production version in the registry (see `sluice train`).
    serve_models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["delivery_eta"])
    # Adaptive batching (Clipper's AIMD), one batch size per model version: a request's whole
    # time in the server (queue + feature read + predict) must stay within the objective; the
    # size grows by batch_increase while it does and is multiplied by batch_backoff (Clipper:
    # ~10% less) when it does not (serving/batcher.py). max_batch_delay_ms waits to fill a
    # batch (0: never wait).
    latency_objective_ms: float = Field(default=20.0, gt=0, le=60_000)
    max_batch_delay_ms: float = Field(default=1.0, ge=0, le=1_000)
    max_batch_size: int = Field(default=256, ge=1, le=100_000)
    batch_increase: int = Field(default=2, ge=1, le=1_000)
    batch_backoff: float = Field(default=0.9, gt=0, lt=1)
    # Prediction cache (serving/cache.py): predictions by (model, version, feature vector), LRU
    # within this many bytes (0: no cache).
    cache_max_bytes: int = Field(default=64 * 2**20, ge=0)
    # Rollout (promote, rollback, canary, shadow): changes reach every replica through Redis
    # pub/sub at once, and each replica re-reads the registry every rollout_poll_s anyway (so a
    # missed notice is repaired within that time).
    rollout_poll_s: float = Field(default=1.0, gt=0, le=3_600)
    # "local": notices within this process only (one replica; the poll still syncs others).
    rollout_bus: Literal["redis", "local"] = "redis"
    # Prediction log and feedback topics. Records go through a local write-ahead log
    # (serving/wal.py) in prediction_log_dir (default <state_dir>/prediction-log, one per
    # predictor), bounded by prediction_log_max_bytes (beyond: dropped, counted), fsynced every
    # prediction_log_fsync_ms (a machine crash loses at most that much; a process crash
    # nothing; 0 syncs every record). A record the broker refuses for itself (too large, not
    # authorised) is given up after prediction_log_retries more attempts; an unreachable
    # broker never fails a record, it waits on disk.
    prediction_topic: str = "sluice.predictions"
    feedback_topic: str = "sluice.feedback"
    prediction_log_dir: Path | None = None
    prediction_log_max_bytes: int = Field(default=1 << 30, ge=1 << 20)
    prediction_log_fsync_ms: float = Field(default=100.0, ge=0, le=60_000)
    prediction_log_retries: int = Field(default=5, ge=0, le=1_000)
    # Model selection among the production version and the bandit_arms - 1 newest other
    # versions (serving/selection.py): "fixed" serves production only; "epsilon_greedy"
    # (bandit_epsilon), "exp3" and "exp4" (an ensemble of every arm) learn from labels joined
    # with the prediction log by the feedback consumer (serving/feedback.py). bandit_epsilon > 0
    # with selection_policy "fixed" means epsilon_greedy (the setting predates the others).
    selection_policy: Literal["fixed", "epsilon_greedy", "exp3", "exp4"] = "fixed"
    bandit_epsilon: float = Field(default=0.0, ge=0, le=1)
    bandit_arms: int = Field(default=2, ge=1, le=20)
    # Exp3/Exp4 learning rate, and Exp3's share of uniform exploration (0: Clipper's p = w/sum).
    bandit_eta: float = Field(default=0.1, gt=0, le=10)
    bandit_exploration: float = Field(default=0.0, ge=0, lt=1)
    # Loss = |label - prediction| / bandit_loss_scale, clipped to 1 (in the label's unit).
    bandit_loss_scale: float = Field(default=600.0, gt=0)
    # A request field whose value keeps its own policy state (e.g. zone_id); empty: one state.
    bandit_context_field: str = ""
    # The feedback consumer: its group (shared by replicas: each label is applied once), how
    # long a prediction waits for its label (also how far back a restart re-reads the
    # prediction log), and how close in time a label event (e.g. a
    # delivery) must be to a prediction of the same entities to be its label.
    feedback_group: str = "sluice-feedback"
    feedback_horizon_s: float = Field(default=7200.0, gt=0, le=7 * 86_400)
    feedback_match_ms: int = Field(default=60_000, ge=0, le=86_400_000)
    # Ensembles (exp4): versions not back within ensemble_deadline_ms of the batch's predict
    # step are left out and named; with fewer than ensemble_min_models answers (capped at the
    # number of arms) the production version's answer is returned, flagged as the fallback.
    ensemble_deadline_ms: float = Field(default=20.0, gt=0, le=60_000)
    ensemble_min_models: int = Field(default=2, ge=1, le=20)
    # Availability contract (features/contract.py): when a view's newest servable row is older
    # than the window due at t (the stream is late), "flag" serves it and lists the view under
    # `behind`; "empty" serves the view's empty values, flagged alike; "reject" answers 503
    # (features_behind) naming the views.
    serve_behind: Literal["flag", "empty", "reject"] = "flag"
    # Deadlines on the request path (serving/deadlines.py, serving/breaker.py). Every Redis
    # client connects within redis_connect_timeout_ms and waits at most redis_timeout_ms for a
    # reply (writers: the stream, backfills); the predictor's feature reads wait at most
    # redis_read_timeout_ms. A /predict answers within its deadline: request_deadline_ms, or
    # the caller's (body deadline_ms or header X-Request-Timeout-Ms) capped at
    # request_deadline_max_ms. When the online store is slow or down, serve_store_unavailable
    # decides: "degraded" answers with the views' empty values, each row flagged `degraded`;
    # "reject" answers 503 (feature_store_unavailable), or 504 (deadline_exceeded) when the
    # deadline passes first. After breaker_failures failed reads in a row the predictor stops
    # asking Redis for breaker_open_ms, then lets one read through to probe it.
    redis_connect_timeout_ms: float = Field(default=500.0, ge=1, le=60_000)
    redis_timeout_ms: float = Field(default=10_000.0, ge=1, le=600_000)
    redis_read_timeout_ms: float = Field(default=100.0, ge=1, le=60_000)
    request_deadline_ms: float = Field(default=1_000.0, ge=1, le=600_000)
    request_deadline_max_ms: float = Field(default=30_000.0, ge=1, le=600_000)
    serve_store_unavailable: Literal["degraded", "reject"] = "degraded"
    breaker_failures: int = Field(default=3, ge=1, le=1_000)
    breaker_open_ms: float = Field(default=500.0, ge=1, le=600_000)

    @field_validator("request_deadline_max_ms")
    @classmethod
    def _check_deadline_max(cls, value: float, info: ValidationInfo) -> float:
        default = info.data.get("request_deadline_ms")
        if default is not None and value < default:
            raise ValueError(
                f"{value:g} is below request_deadline_ms ({default:g}); "
                "the maximum must allow the default deadline"
            )
        return value

    @field_validator("serve_store_unavailable", mode="before")
    @classmethod
    def _check_store_unavailable(cls, value: Any) -> Any:
        if value not in ("degraded", "reject"):
            raise ValueError(f"expected degraded or reject, got {str(value)[:40]!r}")
        return value

    # API bearer tokens (serving/auth.py): each a list (tok1,tok2 or a JSON list) of secrets
    # of 16 to 512 printable characters. admin_tokens may promote and manage models (and do
    # anything else); without one, those routes answer 403. predict_tokens (POST /predict,
    # GET /models) and feedback_tokens (POST /feedback) are optional: a scope without tokens
    # is open to anyone. `sluice serve` refuses a non-loopback host while predict or feedback
    # is open, unless --allow-unauthenticated.
    admin_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    predict_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    feedback_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # Request limits: bodies above max_request_bytes answer 413 before they are parsed (also
    # when chunked, without Content-Length); a /predict with more rows than max_request_rows
    # answers 422 naming `rows`.
    max_request_bytes: int = Field(default=1_048_576, ge=1024, le=1_073_741_824)
    max_request_rows: int = Field(default=1000, ge=1, le=1_000_000)

    @field_validator("serve_behind", mode="before")
    @classmethod
    def _check_serve_behind(cls, value: Any) -> Any:
        if value not in ("flag", "empty", "reject"):
            raise ValueError(f"expected flag, empty or reject, got {str(value)[:40]!r}")
        return value

    @field_validator("selection_policy", mode="before")
    @classmethod
    def _check_selection_policy(cls, value: Any) -> Any:
        if value not in ("fixed", "epsilon_greedy", "exp3", "exp4"):
            raise ValueError(
                f"expected fixed, epsilon_greedy, exp3 or exp4, got {str(value)[:40]!r}"
            )
        return value

    @field_validator("serve_models", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        return parse_list(value)

    @field_validator("admin_tokens", "predict_tokens", "feedback_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        tokens = parse_list(value)
        if isinstance(tokens, list):
            for n, token in enumerate(tokens, 1):
                text = token.get_secret_value() if isinstance(token, SecretStr) else token
                if not isinstance(text, str) or not TOKEN_TEXT.match(text):
                    # Never the value: it is (or was meant to be) a secret.
                    raise ValueError(
                        f"token {n} is not 16 to 512 printable characters without spaces or "
                        "commas (expected tok1,tok2 or a JSON list of tokens)"
                    )
        return tokens

    @field_validator("serve_models")
    @classmethod
    def _check_serve_models(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one model to serve (expected name or name1,name2)")
        if len(set(value)) != len(value):
            raise ValueError("a model is named twice")
        return value
