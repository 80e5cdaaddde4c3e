"""Settings from environment variables (prefix SLUICE_) or a YAML file (SLUICE_CONFIG).

Defaults describe the local stack; pointing at a real Kafka cluster and Redis is a matter of
setting SLUICE_KAFKA_BOOTSTRAP and SLUICE_REDIS_URL. Precedence: env > YAML file > defaults.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import SettingsError

_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# Data paths default under the checkout, so `sluice` and `feast` (run in feature_repo/) agree.
DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sluice"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_", extra="forbid")

    kafka_bootstrap: str = "127.0.0.1:9092"
    # Extra librdkafka settings (security.protocol, sasl.*) for real clusters.
    kafka_config: dict[str, str] = Field(default_factory=dict)
    redis_url: str = "redis://127.0.0.1:6379/0"
    state_dir: Path = Field(default_factory=_default_state_dir)
    dead_letter_topic: str = "sluice.dead-letter"
    topic_partitions: int = Field(default=4, ge=1, le=1024)
    # Where `sluice produce --history` writes parquet event history.
    history_dir: Path = DATA_DIR / "history"
    # Feature store: the Feast project, its registry and the parquet offline store.
    feast_project: str = "sluice"
    offline_store_dir: Path = DATA_DIR / "offline"
    feast_registry: Path = DATA_DIR / "registry.db"
    # Module whose top-level definitions (views, services, ...) make up the registry.
    definitions_module: str = "examples.delivery.features"
    # Spark master: local[*] here, spark://host:7077 or yarn on a cluster.
    spark_master: str = "local[*]"
    # Flink: empty runs `sluice stream` on a local mini-cluster; "host:port" of a JobManager's
    # REST endpoint submits it there (the cluster's Python workers need this package installed).
    flink_jobmanager: str = ""
    flink_parallelism: int = Field(default=1, ge=1, le=1024)
    # Seconds between checkpoints: the most a restart re-reads, and how long rows may repeat.
    flink_checkpoint_interval_s: float = Field(default=10.0, ge=1, le=3600)
    # Seconds a `sluice up` waits for each component to answer.
    startup_timeout_s: float = Field(default=30.0, gt=0)
    # Model registry: a local directory or an object-store URI (s3://bucket/prefix), read and
    # written through pyarrow.fs, so one setting moves it to shared storage.
    models_dir: str = str(DATA_DIR / "models")
    # Predictor (`sluice serve`).
    serve_host: str = "127.0.0.1"
    serve_port: int = Field(default=8000, ge=1, le=65535)
    # Models served: each needs a production version in the registry (see `sluice train`).
    serve_models: list[str] = Field(default_factory=lambda: ["delivery_eta"])
    # Adaptive batching (Clipper's AIMD): a batch's feature read + predict must stay within the
    # objective; the size grows by batch_increase while it does and is multiplied by
    # batch_backoff when it does not. max_batch_delay_ms waits to fill a batch (0: never wait).
    latency_objective_ms: float = Field(default=20.0, gt=0, le=60_000)
    max_batch_delay_ms: float = Field(default=1.0, ge=0, le=1_000)
    max_batch_size: int = Field(default=256, ge=1, le=100_000)
    batch_increase: int = Field(default=2, ge=1, le=1_000)
    batch_backoff: float = Field(default=0.5, gt=0, lt=1)
    # Prediction log and feedback topics; the in-memory queue in front of the producer is
    # bounded so that a slow broker never blocks or exhausts a request path.
    prediction_topic: str = "sluice.predictions"
    feedback_topic: str = "sluice.feedback"
    prediction_log_queue: int = Field(default=100_000, ge=1)
    prediction_log_retries: int = Field(default=5, ge=0, le=1_000)
    # Model selection among versions: 0 serves the production version only; above 0, an
    # epsilon-greedy choice among the production version and the bandit_arms - 1 newest other
    # versions, rewarded by -|error| from /feedback.
    bandit_epsilon: float = Field(default=0.0, ge=0, le=1)
    bandit_arms: int = Field(default=2, ge=1, le=20)
    # Availability contract (features/contract.py): when a view's newest servable row is older
    # than the window due at t (the stream is late), "flag" serves it and lists the view under
    # `behind`; "empty" serves the view's empty values, flagged alike; "reject" answers 503
    # (features_behind) naming the views.
    serve_behind: Literal["flag", "empty", "reject"] = "flag"

    @field_validator("serve_behind", mode="before")
    @classmethod
    def _check_serve_behind(cls, value: Any) -> Any:
        if value not in ("flag", "empty", "reject"):
            raise ValueError(f"expected flag, empty or reject, got {str(value)[:40]!r}")
        return value

    @field_validator("kafka_bootstrap")
    @classmethod
    def _check_bootstrap(cls, value: str) -> str:
        for address in value.split(","):
            host, _, port = address.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{address!r} is not host:port")
        return value

    @field_validator("prediction_topic", "feedback_topic", "dead_letter_topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        if not _TOPIC.match(value):
            raise ValueError(f"{value!r} is not a Kafka topic name (letters, digits, . _ -)")
        return value

    @field_validator("models_dir")
    @classmethod
    def _check_models_dir(cls, value: str) -> str:
        scheme = urlparse(value).scheme
        # A one-letter scheme is a Windows drive, not a URI; pyarrow.fs knows these schemes.
        if len(scheme) > 1 and scheme not in ("file", "s3", "gs", "gcs", "hdfs"):
            raise ValueError(f"{value!r}: scheme {scheme!r} is not file, s3, gs or hdfs")
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("serve_models")
    @classmethod
    def _check_serve_models(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one model to serve")
        if len(set(value)) != len(value):
            raise ValueError("a model is named twice")
        return value

    @field_validator("flink_jobmanager")
    @classmethod
    def _check_jobmanager(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if value and (not host or not port.isdigit()):
            raise ValueError(f"{value!r} is not host:port of a Flink JobManager's REST endpoint")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
            raise ValueError(f"{value!r} is not a redis:// URL")
        return value

    @property
    def broker_address(self) -> tuple[str, int]:
        host, _, port = self.kafka_bootstrap.split(",")[0].strip().rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def redis_address(self) -> tuple[str, int]:
        parsed = urlparse(self.redis_url)
        return parsed.hostname or "127.0.0.1", parsed.port or 6379

    def kafka_client_config(self, **overrides: Any) -> dict[str, Any]:
        """librdkafka config for any client: bootstrap, extra settings, then overrides."""
        return {"bootstrap.servers": self.kafka_bootstrap, **self.kafka_config, **overrides}


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from env, the YAML file (argument or SLUICE_CONFIG) and explicit overrides."""
    path = config_file or (Path(p) if (p := os.environ.get("SLUICE_CONFIG")) else None)
    from_file: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SettingsError(f"config file {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise SettingsError(f"config file {path}: expected a mapping of settings")
        from_file = loaded
    env_names = {name for name in Settings.model_fields if f"SLUICE_{name.upper()}" in os.environ}
    # Env beats the file: drop file keys that the environment sets.
    init = {k: v for k, v in from_file.items() if k not in env_names} | overrides
    try:
        return Settings(**init)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
