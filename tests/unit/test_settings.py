"""Settings as people write them: lists and mappings from the environment, one-line errors that
name the variable (or the config file key) and what it expects, misspelt variables reported,
and secrets that never reach a repr, an error line, a log line or `sluice features env`."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.errors import SettingsError
from core.logs import JsonFormatter, configure_logging, scrub
from core.settings import Settings, expected, load_settings, unknown_variables
from core.settings_values import LIBRDKAFKA_LOGGER, mask_kafka_config, mask_url


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No SLUICE_* variable of the caller's shell leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("SLUICE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def error_of(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("value", "models"),
    [
        ("delivery_eta", ["delivery_eta"]),
        ("a,b", ["a", "b"]),
        (" a , b ,", ["a", "b"]),
        ('["a", "b"]', ["a", "b"]),
        ("[]", None),
    ],
)
def test_serve_models_as_people_write_them(clean_env, value, models):
    clean_env.setenv("SLUICE_SERVE_MODELS", value)
    if models is None:
        with pytest.raises(SettingsError, match="SLUICE_SERVE_MODELS: name at least one model"):
            load_settings()
    else:
        assert load_settings().serve_models == models


def test_a_broken_json_list_names_the_variable(clean_env):
    message = error_of(clean_env, SLUICE_SERVE_MODELS='["a", ')
    assert message.startswith("invalid setting SLUICE_SERVE_MODELS: not a JSON list")


@pytest.mark.parametrize(
    ("value", "config"),
    [
        ("", {}),
        ("security.protocol=SASL_SSL", {"security.protocol": "SASL_SSL"}),
        (
            "security.protocol=SASL_SSL, sasl.mechanism=PLAIN,sasl.password=p,w",
            {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "sasl.password": "p,w"},
        ),
        (
            '{"linger.ms": 5, "enable.idempotence": true}',
            {"linger.ms": "5", "enable.idempotence": "true"},
        ),
    ],
)
def test_kafka_config_as_json_or_pairs(clean_env, value, config):
    clean_env.setenv("SLUICE_KAFKA_CONFIG", value)
    settings = load_settings()
    assert settings.kafka_config == config
    client = settings.kafka_client_config(**{"group.id": "g"})
    assert client["bootstrap.servers"] == settings.kafka_bootstrap
    assert client["group.id"] == "g"
    assert {k: client[k] for k in config} == config  # the real values reach librdkafka
    assert client["logger"] is logging.getLogger(LIBRDKAFKA_LOGGER)


@pytest.mark.parametrize("value", ['{"sasl.password": "hunter2"', "hunter2", "=hunter2", "[1]"])
def test_a_malformed_kafka_config_is_one_line_without_the_value(clean_env, value):
    message = error_of(clean_env, SLUICE_KAFKA_CONFIG=value)
    assert message.startswith("invalid setting SLUICE_KAFKA_CONFIG: ")
    assert "hunter2" not in message
    assert "JSON object" in message or "key=value" in message


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("SLUICE_TOPIC_PARTITIONS", "abc", "expected an integer from 1 to 1024, got 'abc'"),
        ("SLUICE_TOPIC_PARTITIONS", "0", "expected an integer from 1 to 1024, got '0'"),
        ("SLUICE_BATCH_BACKOFF", "1.5", "expected a number greater than 0 and less than 1"),
        ("SLUICE_STARTUP_TIMEOUT_S", "soon", "expected a number greater than 0"),
        ("SLUICE_SERVE_PORT", "80000", "expected an integer from 1 to 65535"),
        ("SLUICE_KAFKA_BOOTSTRAP", "localhost", "'localhost' is not host:port"),
        ("SLUICE_REDIS_URL", "localhost:6379", "is not a redis:// URL"),
        ("SLUICE_MODELS_DIR", "ftp://host/models", "scheme 'ftp'"),
        ("SLUICE_DEAD_LETTER_TOPIC", "dead letters", "not a Kafka topic name"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_it_expects(clean_env, variable, value, words):
    message = error_of(clean_env, **{variable: value})
    assert message.startswith(f"invalid setting {variable}: ")
    assert words in message


def test_several_bad_values_are_one_line(clean_env):
    message = error_of(clean_env, SLUICE_TOPIC_PARTITIONS="x", SLUICE_SERVE_PORT="0")
    assert message.startswith("invalid settings ")
    assert "SLUICE_TOPIC_PARTITIONS: " in message
    assert "SLUICE_SERVE_PORT: " in message


def test_lower_case_variables_count_and_are_named_as_written(clean_env):
    clean_env.setenv("sluice_topic_partitions", "7")
    assert load_settings().topic_partitions == 7
    message = error_of(clean_env, sluice_topic_partitions="many")
    assert message.startswith("invalid setting sluice_topic_partitions: ")


def test_the_config_file_names_its_keys(clean_env, tmp_path: Path):
    path = tmp_path / "sluice.yaml"
    path.write_text("topic_partitions: 0\nserve_models: a, b\nkafka_config: {linger.ms: 5}\n")
    with pytest.raises(SettingsError, match=rf"^invalid setting topic_partitions in {path}: "):
        load_settings(path)
    path.write_text("topic_partitions: 3\nserve_models: a, b\nkafka_config: {linger.ms: 5}\n")
    settings = load_settings(path)
    assert (settings.topic_partitions, settings.serve_models) == (3, ["a", "b"])
    assert settings.kafka_config == {"linger.ms": "5"}
    # Env beats the file; explicit overrides beat both.
    clean_env.setenv("SLUICE_TOPIC_PARTITIONS", "5")
    assert load_settings(path).topic_partitions == 5
    assert load_settings(path, topic_partitions=6).topic_partitions == 6
    # SLUICE_CONFIG names the file when no argument does.
    clean_env.setenv("SLUICE_CONFIG", str(path))
    assert load_settings().serve_models == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "topic_partitons: 3\n",
            "topic_partitons in {path}: not a setting (did you mean topic_partitions?)",
        ),
        ("- a\n- b\n", "expected a mapping of settings"),
        ("a: [1,\n", "not YAML at line"),
    ],
)
def test_a_bad_config_file_is_one_line(clean_env, tmp_path: Path, text, words):
    path = tmp_path / "sluice.yaml"
    path.write_text(text)
    with pytest.raises(SettingsError) as caught:
        load_settings(path)
    assert words.format(path=path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_missing_config_file(clean_env, tmp_path: Path):
    with pytest.raises(SettingsError, match=r"config file .*nope.yaml: No such file"):
        load_settings(tmp_path / "nope.yaml")


def test_code_overrides_are_named_by_field(clean_env):
    with pytest.raises(SettingsError, match=r"^invalid setting latency_objective_ms: expected"):
        load_settings(latency_objective_ms=0)


def test_misspelt_variables_are_reported_with_the_closest_setting():
    environ = {
        "SLUICE_TOPIC_PARTITONS": "3",
        "SLUICE_REDIS_URI": "redis://h:1/0",
        "SLUICE_ZZZ": "1",
        "SLUICE_CONFIG": "x.yaml",  # known, not a setting
        "SLUICE_FEAST_REDIS_CONNECTION": "h:1,db=0",  # written by `sluice features env`
        "SLUICE_TOPIC_PARTITIONS": "3",
        "PATH": "/bin",
    }
    assert unknown_variables(environ) == [
        "SLUICE_REDIS_URI is not a Sluice setting and is ignored (did you mean SLUICE_REDIS_URL?)",
        "SLUICE_TOPIC_PARTITONS is not a Sluice setting and is ignored "
        "(did you mean SLUICE_TOPIC_PARTITIONS?)",
        "SLUICE_ZZZ is not a Sluice setting and is ignored",
    ]


def test_a_misspelt_variable_is_not_fatal(clean_env):
    clean_env.setenv("SLUICE_TOPIC_PARTITONS", "3")
    assert load_settings().topic_partitions == 4


def test_every_setting_says_what_it_expects():
    for name in Settings.model_fields:
        assert expected(name), name


# Secrets.

SECRET_URL = "redis://app:hunter2@redis.internal:6380/1"
SECRET_KAFKA = {"sasl.username": "app", "sasl.password": "hunter2", "ssl.key.pem": "hunter2"}


def test_mask_url_and_kafka_config():
    assert mask_url(SECRET_URL) == "redis://app:***@redis.internal:6380/1"
    assert mask_url("rediss://:hunter2@h:1/0") == "rediss://:***@h:1/0"
    assert mask_url("redis://h:1/0") == "redis://h:1/0"
    assert mask_kafka_config(SECRET_KAFKA) == {
        "sasl.username": "app",
        "sasl.password": "***",
        "ssl.key.pem": "***",
    }


def test_repr_and_str_of_settings_hide_secrets(clean_env):
    settings = load_settings(redis_url=SECRET_URL, kafka_config=SECRET_KAFKA)
    for text in (repr(settings), str(settings), f"{settings}"):
        assert "hunter2" not in text
        assert "redis://app:***@redis.internal:6380/1" in text
        assert "'sasl.username': 'app'" in text
    assert settings.redis_url == SECRET_URL  # the value itself is intact for the clients
    assert settings.redis_url_masked == mask_url(SECRET_URL)


def test_a_bad_redis_url_error_masks_its_password(clean_env):
    message = error_of(clean_env, SLUICE_REDIS_URL="http://app:hunter2@h:1/0")
    assert "hunter2" not in message
    assert "'http://app:***@h:1/0' is not a redis:// URL" in message
    message = error_of(clean_env, SLUICE_REDIS_URL="redis://app:hunter2@h:99999/0")
    assert "hunter2" not in message
    assert "port" in message


def test_log_lines_never_hold_secrets(clean_env):
    settings = load_settings(redis_url=SECRET_URL, kafka_config=SECRET_KAFKA)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("sluice.test_settings")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("connecting to %s", SECRET_URL, extra={"settings": settings})
        log.warning("feast", extra={"connection": "h:6380,db=1,password=hunter2,ssl=true"})
        log.warning("kafka", extra={"config": dict(SECRET_KAFKA)})
        try:
            raise RuntimeError(f"cannot reach {SECRET_URL}")
        except RuntimeError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    for line in lines:
        json.loads(line)  # still JSON
        assert "hunter2" not in line, line
    assert "redis://app:***@redis.internal" in lines[0]


def test_scrub_leaves_ordinary_text_alone():
    text = "password authentication failed for redis://h:1/0; tokens=3"
    assert scrub(text) == text


def test_librdkafka_lines_show_from_info_on():
    try:
        configure_logging("WARNING")
        assert not logging.getLogger(LIBRDKAFKA_LOGGER).isEnabledFor(logging.CRITICAL)
        configure_logging("info")
        assert logging.getLogger(LIBRDKAFKA_LOGGER).isEnabledFor(logging.ERROR)
        with pytest.raises(ValueError, match="unknown log level"):
            configure_logging("loud")
    finally:
        logging.captureWarnings(False)
        for name in ("sluice", "py.warnings"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.setLevel(logging.NOTSET)
            logger.propagate = True
        logging.getLogger(LIBRDKAFKA_LOGGER).setLevel(logging.NOTSET)


def test_features_env_masks_the_redis_password_unless_asked(clean_env):
    from cli.main import app

    env = {"SLUICE_REDIS_URL": SECRET_URL, "COLUMNS": "200"}
    runner = CliRunner()
    masked = runner.invoke(app, ["features", "env"], env=env)
    assert masked.exit_code == 0, masked.output
    assert "hunter2" not in masked.output
    assert (
        "export SLUICE_FEAST_REDIS_CONNECTION=redis.internal:6380,db=1,username=app,password=***"
        in (masked.output.replace("'", ""))
    )
    assert "--show-secrets" in masked.output  # the warning line says how to get them
    shown = runner.invoke(app, ["features", "env", "--show-secrets"], env=env)
    assert shown.exit_code == 0, shown.output
    assert "password=hunter2" in shown.output
