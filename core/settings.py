"""Settings from environment variables (prefix SLUICE_) or a YAML file (SLUICE_CONFIG).

Defaults describe the local stack; pointing at a real Kafka cluster and Redis is a matter of
setting SLUICE_KAFKA_BOOTSTRAP and SLUICE_REDIS_URL. Precedence: explicit overrides > env >
YAML file > defaults.

Values are written the way people write them: a list (``serve_models``) is one name, names
separated by commas (``a,b``) or a JSON list; a mapping (``kafka_config``) is
``key=value,key2=value2`` or a JSON object. A bad value is one SettingsError line naming where
it came from (``SLUICE_TOPIC_PARTITIONS``, ``topic_partitions in <file>``) and what is expected.

Unknown ``SLUICE_*`` variables are not errors, only reported: ``unknown_variables()`` names
each with the closest setting and the CLI prints one warning line for each (the environment is
shared with other tools and other Sluice versions; a misspelt variable leaves its setting at the
default, which the warning makes visible). An unknown key in the YAML file is an error: the file
belongs to Sluice alone.

Secrets never leave this object in clear: the password of ``redis_url`` and secret
``kafka_config`` values (``sasl.password``, ``ssl.key.password``, ...) are masked in ``repr``,
in error messages and in logs (core/logs.py scrubs them); ``mask_url`` and
``mask_kafka_config`` do the same for anything that displays settings. API tokens
(``admin_tokens``, ``predict_tokens``, ``feedback_tokens``) are SecretStr: only
serving/auth.py reads their values, and no error message echoes them.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import urlparse

import annotated_types
import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from core.errors import SettingsError
from core.settings_serving import ServingSettings
from core.settings_values import (
    DATA_DIR,
    LIBRDKAFKA_LOGGER,
    MASK,
    TOPIC_NAME,
    default_state_dir,
    mask_kafka_config,
    mask_url,
    parse_mapping,
)

ENV_PREFIX = "SLUICE_"
# SLUICE_* variables that are not settings but are read by Sluice or feature_store.yaml.
OTHER_VARIABLES = frozenset({"SLUICE_CONFIG", "SLUICE_FEAST_REDIS_CONNECTION"})


# librdkafka logs go to this logger (not to stderr); core/logs.py decides what shows.
class Settings(ServingSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    kafka_bootstrap: str = "127.0.0.1:9092"
    # Extra librdkafka settings (security.protocol, sasl.*) for real clusters.
    kafka_config: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    redis_url: str = "redis://127.0.0.1:6379/0"
    state_dir: Path = Field(default_factory=default_state_dir)
    dead_letter_topic: str = "sluice.dead-letter"
    topic_partitions: int = Field(default=4, ge=1, le=1024)
    # Ingest writes a heartbeat (no key, empty value, header sluice.kind=heartbeat) to each
    # partition of events.<source> that had no record for this long, stamped with the event
    # time the partition last saw plus the wall time since, so the stream's watermark moves
    # on when traffic stops and the last windows close on time. 0 disables heartbeats.
    ingest_heartbeat_ms: int = Field(default=1000, ge=0, le=3_600_000)
    # Ingest dead-letters a raw event bigger than this (reason too_large) before parsing it,
    # which bounds its memory; below librdkafka's 1,000,000-byte message limit, so that what
    # ingest forwards or dead-letters is never refused for its size.
    ingest_max_event_bytes: int = Field(default=128 * 1024, ge=1024, le=900_000)
    # Bucket mount (core/uris.py, issue 15): the absolute directory where every Spark and Flink
    # machine mounts the object store's buckets, <dir>/<bucket>/<key> (s3fs, Mountpoint for S3,
    # a CSI driver; `sluice up --cluster` mounts its bucket under <state_dir>/cluster/s3). Set:
    # the JVM engines reach s3:// locations through it, and history_dir, offline_store_dir and
    # feast_registry may be s3:// URIs (read as files under the mount). Empty: the engines
    # speak S3 natively (hadoop-aws for Spark, flink-s3-fs-hadoop for Flink). Declared before
    # the path settings so that their validator sees it.
    s3_mount_dir: str = ""
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
    # "tiles-java": Flink SQL decodes, filters and pre-aggregates per (entity, slide) in Java,
    # and windows are assembled in the JVM too; Python sees the newest row per entity and
    # firing, for the online store (streaming/java_windows.py). "tiles": the same SQL, Python
    # assembles windows from one row per tile. "events": the stream's Python sees every event
    # (a view the tile engines cannot run exactly runs per event under any).
    stream_engine: Literal["events", "tiles", "tiles-java"] = "tiles-java"
    # Where the stream job's Python functions run: "thread" (PEMJA, in the TaskManager's JVM;
    # streaming/python_operators.py gives them bundle ends, so writes stay at least once) or
    # "process" (Beam workers beside the JVM). Thread mode measured 1.3x faster for tiles-java.
    flink_python_mode: Literal["thread", "process"] = "thread"
    # Seconds a `sluice up` waits for each component to answer.
    startup_timeout_s: float = Field(default=30.0, gt=0)
    # Model registry: a local directory or an object-store URI (s3://bucket/prefix), read and
    # written through pyarrow.fs, so one setting moves it to shared storage.
    models_dir: str = str(DATA_DIR / "models")
    # Monitoring (`sluice monitor`, monitoring/): results and alerts go to monitoring_topic;
    # statistics cover tumbling periods of monitor_period_s (epoch-aligned, by record time);
    # a period closes once every active partition's records passed its end plus
    # monitor_grace_s. monitor_group's committed offsets make a restart resume. Drift is
    # judged from monitor_min_rows rows of a model version in a period; a share of
    # monitor_skew_sample of the logged rows (by a hash of their entity keys) is recomputed
    # offline with Spark (0: no skew check). The dashboard (`--serve`) listens on
    # monitor_host:monitor_port.
    monitoring_topic: str = "sluice.monitoring"
    monitor_period_s: float = Field(default=60.0, ge=0.5, le=86_400)
    monitor_grace_s: float = Field(default=5.0, ge=0, le=3_600)
    monitor_group: str = "sluice-monitor"
    monitor_min_rows: int = Field(default=100, ge=1, le=10_000_000)
    monitor_skew_sample: float = Field(default=0.05, ge=0, le=1)
    monitor_host: str = "127.0.0.1"
    monitor_port: int = Field(default=8050, ge=1, le=65535)
    # `sluice retrain` promotes a challenger only when its MAE on the held-out newest labels is
    # at least this share below the production model's (0.02: 2% better) and it passes its
    # sanity gates.
    retrain_margin: float = Field(default=0.02, ge=0, lt=1)
    # Object store (core/uris.py resolves every path): the endpoint of an S3-compatible store
    # (empty: AWS itself) and its keys. A path setting may be an s3://bucket/prefix URI.
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_region: str = "us-east-1"
    # Checkpoints and savepoints of `sluice stream`: a URI shared by the Flink cluster (empty:
    # <state_dir>/flink, which only a local mini-cluster or a one-machine cluster can see).
    flink_checkpoint_dir: str = ""
    # `sluice up --cluster` (infra/cluster.py) on loopback: ports used where spark_master,
    # flink_jobmanager and s3_endpoint do not name one, and sizes for a 2-core machine.
    cluster_flink_rest_port: int = Field(default=8081, ge=1, le=65535)
    cluster_spark_master_port: int = Field(default=7077, ge=1, le=65535)
    cluster_spark_ui_port: int = Field(default=8080, ge=1, le=65535)
    cluster_spark_worker_ui_port: int = Field(default=8082, ge=1, le=65535)
    cluster_object_store_port: int = Field(default=9000, ge=1, le=65535)
    cluster_flink_jobmanager_memory: str = "768m"
    cluster_flink_taskmanager_memory: str = "1600m"
    cluster_flink_slots: int = Field(default=2, ge=1, le=64)
    cluster_spark_worker_memory: str = "2g"
    cluster_spark_worker_cores: int = Field(default=2, ge=1, le=256)

    @field_validator("kafka_config", mode="before")
    @classmethod
    def _split_mapping(cls, value: Any) -> Any:
        return parse_mapping(value)

    @field_validator("kafka_bootstrap")
    @classmethod
    def _check_bootstrap(cls, value: str) -> str:
        for address in value.split(","):
            host, _, port = address.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{address.strip()!r} is not host:port (expected host:port,...)")
        return value

    @field_validator("prediction_topic", "feedback_topic", "dead_letter_topic", "monitoring_topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        if not TOPIC_NAME.match(value):
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
            raise ValueError("must not be empty (expected a directory or s3://bucket/prefix)")
        return value

    @field_validator("s3_mount_dir")
    @classmethod
    def _check_mount_dir(cls, value: str, info: Any) -> str:
        from core.errors import StorageError
        from core.uris import mount_dir

        try:
            mount = mount_dir(value, info.field_name)
        except StorageError as exc:
            raise ValueError(str(exc).removeprefix(f"{info.field_name}: ")) from None
        return "" if mount is None else str(mount)

    @field_validator("history_dir", "offline_store_dir", "feast_registry", mode="before")
    @classmethod
    def _local_uri(cls, value: Any, info: Any) -> Any:
        """A file:// URI is its path; s3://bucket/key is its path under s3_mount_dir (Spark,
        Feast and the archive read these as files), and refused without a mount."""
        text = str(value)
        if "://" not in text and not text.startswith("file:/"):
            return value
        from core.errors import StorageError
        from core.uris import mounted_path, parse

        try:
            uri = parse(text, info.field_name)
        except StorageError as exc:
            raise ValueError(str(exc).removeprefix(f"{info.field_name}: ")) from None
        if uri.is_local:
            return uri.path
        mount = info.data.get("s3_mount_dir")
        if not mount:
            raise ValueError(
                f"{text!r}: an object-store location for this setting needs s3_mount_dir, the "
                "directory where every worker mounts the bucket (Spark, Feast and the archive "
                "read it as files; see docs/deployment.md)"
            )
        return mounted_path(uri, Path(mount))

    @field_validator("flink_checkpoint_dir", "s3_endpoint")
    @classmethod
    def _check_storage(cls, value: str, info: Any) -> str:
        if not value:
            return value
        if info.field_name == "s3_endpoint":
            parsed = urlparse(value)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError(f"{value!r} is not http(s)://host:port of an S3 endpoint")
            return value
        from core.errors import StorageError
        from core.uris import parse

        try:
            parse(value, info.field_name)
        except StorageError as exc:
            raise ValueError(str(exc).removeprefix(f"{info.field_name}: ")) from None
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
        try:
            parsed.port  # noqa: B018  # raises ValueError for a port out of range or not a number
        except ValueError:
            message = f"{mask_url(value)!r}: the port is not a number from 1 to 65535"
            raise ValueError(message) from None
        if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
            raise ValueError(f"{mask_url(value)!r} is not a redis:// URL (redis://host:port/db)")
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """repr() and str() mask secrets, so that logging a Settings never leaks one."""
        for name, value in super().__repr_args__():
            if name == "redis_url":
                yield name, mask_url(value)
            elif name == "kafka_config":
                yield name, mask_kafka_config(value)
            elif name == "s3_secret_key" and value:
                yield name, MASK
            else:
                yield name, value

    @property
    def broker_address(self) -> tuple[str, int]:
        host, _, port = self.kafka_bootstrap.split(",")[0].strip().rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def redis_address(self) -> tuple[str, int]:
        parsed = urlparse(self.redis_url)
        return parsed.hostname or "127.0.0.1", parsed.port or 6379

    @property
    def redis_url_masked(self) -> str:
        """redis_url without its password: the form to print."""
        return mask_url(self.redis_url)

    def kafka_client_config(self, **overrides: Any) -> dict[str, Any]:
        """librdkafka config for any client: bootstrap, extra settings, then overrides.

        librdkafka's own log lines go to the ``sluice.librdkafka`` logger instead of stderr
        (core/logs.py shows them from --log-level INFO on); a failure they describe reaches the
        caller as an error anyway.
        """
        return {
            "bootstrap.servers": self.kafka_bootstrap,
            "logger": logging.getLogger(LIBRDKAFKA_LOGGER),
            **self.kafka_config,
            **overrides,
        }


# Settings whose given value is never echoed in an error (it may hold a secret).
_SECRET_FIELDS = frozenset(
    {"kafka_config", "admin_tokens", "predict_tokens", "feedback_tokens", "s3_secret_key"}
)


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def _closest(name: str, known: list[str]) -> str | None:
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per SLUICE_* variable that is no setting, naming the closest setting."""
    environ = os.environ if environ is None else environ
    known = [env_name(name) for name in Settings.model_fields] + sorted(OTHER_VARIABLES)
    warnings = []
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        # Compared without the prefix, which every candidate shares.
        guess = _closest(
            upper.removeprefix(ENV_PREFIX), [k.removeprefix(ENV_PREFIX) for k in known]
        )
        hint = f" (did you mean {ENV_PREFIX}{guess}?)" if guess else ""
        warnings.append(f"{variable} is not a Sluice setting and is ignored{hint}")
    return warnings


def _bounds(metadata: list[Any]) -> list[str]:
    ge = next((m.ge for m in metadata if isinstance(m, annotated_types.Ge)), None)
    le = next((m.le for m in metadata if isinstance(m, annotated_types.Le)), None)
    if ge is not None and le is not None:
        return [f"from {ge} to {le}"]
    words = []
    for item in metadata:
        if isinstance(item, annotated_types.Gt):
            words.append(f"greater than {item.gt}")
        elif isinstance(item, annotated_types.Ge):
            words.append(f"at least {item.ge}")
        elif isinstance(item, annotated_types.Lt):
            words.append(f"less than {item.lt}")
        elif isinstance(item, annotated_types.Le):
            words.append(f"at most {item.le}")
    return words


def expected(field: str) -> str:
    """What a setting takes, in words: 'an integer at least 1 and at most 1024'."""
    info = Settings.model_fields[field]
    kinds: dict[object, str] = {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        Path: "a path",
        str: "text",
    }
    kind = kinds.get(info.annotation, "")
    if get_origin(info.annotation) is Literal:
        kind = "one of " + ", ".join(str(choice) for choice in get_args(info.annotation))
    if field == "serve_models":
        return "one name, name1,name2 or a JSON list of names"
    if field == "kafka_config":
        return "key=value,key2=value2 or a JSON object of librdkafka settings"
    if field.endswith("_tokens"):
        return "tok1,tok2 or a JSON list of tokens (16 to 512 printable characters each)"
    bounds = _bounds(info.metadata)
    return f"{kind} {' and '.join(bounds)}".strip() if bounds else kind or "a valid value"


def _shown(field: str, value: Any) -> str:
    if field in _SECRET_FIELDS:
        return ""
    if field == "redis_url" and isinstance(value, str):
        value = mask_url(value)
    text = repr(value)
    return f", got {text[:60] + '...' if len(text) > 60 else text}"


def _problem(field: str, error: Mapping[str, Any]) -> str:
    """What is wrong with one value and what is expected, in one clause."""
    if error["type"] == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        guess = _closest(field, list(Settings.model_fields))
        return "not a setting" + (f" (did you mean {guess}?)" if guess else "")
    return f"expected {expected(field)}{_shown(field, error.get('input'))}"


def _describe(exc: ValidationError, origin: Mapping[str, str]) -> str:
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        where = origin.get(field, field)
        problems.append(f"{where}: {_problem(field, error)}")
    label = "invalid setting" if len(problems) == 1 else "invalid settings"
    return f"{label} {'; '.join(problems)}"


def _environment_names() -> dict[str, str]:
    """Setting -> the SLUICE_* variable that sets it (pydantic-settings ignores case)."""
    by_upper = {name.upper(): name for name in os.environ}
    return {
        field: by_upper[env_name(field)]
        for field in Settings.model_fields
        if env_name(field) in by_upper
    }


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from env, the YAML file (argument or SLUICE_CONFIG) and explicit overrides."""
    path = config_file or (Path(p) if (p := os.environ.get("SLUICE_CONFIG")) else None)
    from_file: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise SettingsError(f"config file {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise SettingsError(f"config file {path}: not YAML{line} ({problem})") from None
        if not isinstance(loaded, dict):
            raise SettingsError(f"config file {path}: expected a mapping of settings")
        from_file = {str(k): v for k, v in loaded.items()}
    env_names = _environment_names()
    # Env beats the file: drop file keys that the environment sets.
    init = {k: v for k, v in from_file.items() if k not in env_names} | overrides
    # Where each value came from, for the error message (the same precedence).
    origin = {k: f"{k} in {path}" for k in from_file} | env_names | {k: k for k in overrides}
    try:
        return Settings(**init)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, origin)) from None
    except PydanticSettingsError as exc:  # a value pydantic-settings could not even decode
        field = next((f for f in env_names if f'"{f}"' in str(exc)), None)
        where = env_names.get(field, "a SLUICE_ variable") if field else "a SLUICE_ variable"
        what = expected(field) if field else "a valid value"
        raise SettingsError(f"invalid setting {where}: expected {what}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
