"""core/uris.py: every path is a URI, resolved in one place."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import StorageError
from core.settings import load_settings
from core.uris import (
    S3Options,
    StorageUri,
    ensure_bucket,
    exists,
    filesystem,
    flink_conf,
    parse,
    spark_conf,
)
from models.registry import ModelRegistry


def test_plain_paths_become_absolute_file_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    uri = parse("data/history")
    assert uri == StorageUri("file", str(tmp_path / "data" / "history"))
    assert str(uri) == (tmp_path / "data" / "history").as_uri()
    assert parse(str(uri)) == uri  # round trip
    assert parse(f"file:{tmp_path}/x") == parse(tmp_path / "x")  # as Flink writes them
    assert parse(tmp_path) == StorageUri("file", str(tmp_path))
    assert uri.local_path() == tmp_path / "data" / "history"


def test_s3_uris_and_their_engine_forms():
    uri = parse("s3://sluice/history/")
    assert (uri.bucket, uri.path) == ("sluice", "history")
    assert str(uri) == "s3://sluice/history"
    assert uri.for_spark() == "s3a://sluice/history"
    assert uri.for_flink() == "s3://sluice/history"
    assert uri.for_python() == "sluice/history"
    assert parse("s3a://sluice/x") == parse("s3://sluice/x")
    assert str(parse("s3://sluice")) == "s3://sluice"
    assert str(uri.join("deliveries", "date=2026-01-01")) == (
        "s3://sluice/history/deliveries/date=2026-01-01"
    )


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("", "empty"),
        ("gs://bucket/x", "scheme 'gs' is not supported"),
        ("s3://Bad_Bucket/x", "is not a bucket name"),
        ("s3://sluice/x?endpoint=y", "no ?query"),
        ("file://otherhost/x", "names host 'otherhost'"),
    ],
)
def test_bad_uris_name_the_field_and_the_reason(value: str, words: str):
    with pytest.raises(StorageError) as info:
        parse(value, "history_dir")
    assert str(info.value).startswith("history_dir: ")
    assert words in str(info.value)


def test_join_refuses_to_leave_the_location():
    with pytest.raises(StorageError, match="not a relative name"):
        parse("s3://sluice/a").join("../b")


def test_local_path_refuses_object_store_uris():
    with pytest.raises(StorageError, match="offline store is s3://sluice/offline"):
        parse("s3://sluice/offline").local_path("offline store")


def test_engine_settings_carry_endpoint_and_keys_but_repr_hides_the_secret():
    s3 = S3Options("http://127.0.0.1:9000", "key", "secret-value", "eu-west-1")
    conf = spark_conf(s3)
    assert conf["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:9000"
    assert conf["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] == "false"
    assert conf["spark.hadoop.fs.s3a.secret.key"] == "secret-value"
    assert flink_conf(s3) == {
        "s3.endpoint": "http://127.0.0.1:9000",
        "s3.path.style.access": "true",
        "s3.access-key": "key",
        "s3.secret-key": "secret-value",
    }
    assert "secret-value" not in repr(s3)
    assert "secret-value" not in repr(load_settings(s3_secret_key="secret-value"))


def test_settings_check_storage_uris():
    from core.errors import SettingsError

    with pytest.raises(SettingsError, match=r"flink_checkpoint_dir: .*scheme 'gs'"):
        load_settings(flink_checkpoint_dir="gs://b/x")
    with pytest.raises(SettingsError, match=r"s3_endpoint: .*http"):
        load_settings(s3_endpoint="127.0.0.1:9000")
    with pytest.raises(SettingsError, match=r"history_dir: .*needs s3_mount_dir"):
        load_settings(history_dir="s3://sluice/history")
    assert load_settings(offline_store_dir="file:///srv/offline").offline_store_dir == Path(
        "/srv/offline"
    )


def test_local_filesystem_round_trip(tmp_path: Path):
    fs, path = filesystem(tmp_path / "a")
    fs.create_dir(path)
    with fs.open_output_stream(f"{path}/x.txt") as out:
        out.write(b"x")
    assert exists(tmp_path / "a" / "x.txt")
    assert not exists(tmp_path / "missing")


def test_s3_round_trip_and_bucket_creation(s3_store: S3Options):
    ensure_bucket("s3://unit-bucket/", s3_store)
    ensure_bucket("s3://unit-bucket/", s3_store)  # twice is fine
    fs, path = filesystem("s3://unit-bucket/dir", s3_store)
    with fs.open_output_stream(f"{path}/obj.txt") as out:
        out.write(b"payload")
    with fs.open_input_stream(f"{path}/obj.txt") as stream:
        assert stream.read() == b"payload"
    assert exists("s3://unit-bucket/dir/obj.txt", s3_store)
    assert not exists("s3://unit-bucket/dir/other.txt", s3_store)


def test_model_registry_on_s3(s3_store: S3Options):
    from examples.delivery.features import delivery_eta_batch_only
    from models.fit import fit
    from tests.helpers.serving import synthetic_training_set

    ensure_bucket("s3://models-bucket/", s3_store)
    registry = ModelRegistry("s3://models-bucket/models", s3_store)
    assert registry.models() == []
    trained = fit(
        synthetic_training_set(delivery_eta_batch_only),
        delivery_eta_batch_only,
        label="delivery_seconds",
        rounds=5,
    )
    saved = registry.save(trained.model_text, trained.metadata)
    registry.promote(saved.name, saved.version)
    again = ModelRegistry("s3://models-bucket/models", s3_store)  # another process, same store
    assert again.versions(saved.name) == [1]
    assert again.production(saved.name) == 1
    assert again.model_text(saved.name, 1) == trained.model_text
    assert exists(f"s3://models-bucket/models/{saved.name}/1/metadata.json", s3_store)
