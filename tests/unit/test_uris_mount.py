"""core/uris.py's JvmAccess and s3_mount_dir: how Spark and Flink reach s3:// locations
(natively, or through a bucket mount), and the s3fs mount that `up --cluster` makes."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from core.errors import SettingsError, StackError, StorageError
from core.settings import load_settings
from core.uris import (
    JvmAccess,
    S3Options,
    StorageUri,
    ensure_bucket,
    filesystem,
    mount_dir,
    mounted_path,
    parse,
    unmounted,
)
from infra import object_store
from streaming.job import JobOptions, flink_configuration


def test_mount_dir_must_be_an_absolute_directory():
    assert mount_dir("") is None
    assert mount_dir("/mnt/s3/") == Path("/mnt/s3")
    for value, words in [("mnt/s3", "is relative"), ("s3://sluice", "is a URI")]:
        with pytest.raises(StorageError) as info:
            mount_dir(value)
        assert str(info.value).startswith("s3_mount_dir: ")
        assert words in str(info.value)


def test_mounted_paths_round_trip():
    mount = Path("/mnt/s3")
    assert mounted_path("s3://sluice/flink/job/", mount) == Path("/mnt/s3/sluice/flink/job")
    assert mounted_path("s3://sluice", mount) == Path("/mnt/s3/sluice")
    assert mounted_path("/srv/x", mount) == Path("/srv/x")  # file:// is its own path
    # What Flink reports (file:/abs) maps back to the URI the settings name.
    assert unmounted("file:/mnt/s3/sluice/flink/chk-3", mount) == parse("s3://sluice/flink/chk-3")
    assert unmounted("/mnt/s3/sluice", mount) == StorageUri("s3", "", "sluice")
    assert unmounted("/srv/x", mount) == parse("/srv/x")  # not under the mount: unchanged
    assert unmounted("/mnt/s3/Not_A_Bucket/x", mount) == parse("/mnt/s3/Not_A_Bucket/x")


def test_jvm_access_native_or_through_the_mount():
    native = JvmAccess()
    assert native.for_spark("s3://sluice/history") == "s3a://sluice/history"
    assert native.for_flink("s3://sluice/flink") == "s3://sluice/flink"
    assert native.from_engine("s3a://sluice/x") == parse("s3://sluice/x")
    mounted = JvmAccess.from_settings(load_settings(s3_mount_dir="/mnt/s3"))
    assert mounted.for_spark("s3://sluice/history") == "file:///mnt/s3/sluice/history"
    assert mounted.for_flink("s3://sluice/flink") == "file:///mnt/s3/sluice/flink"
    assert mounted.for_flink("/srv/flink") == "file:///srv/flink"
    assert mounted.from_engine("file:/mnt/s3/sluice/sp/savepoint-1") == parse(
        "s3://sluice/sp/savepoint-1"
    )
    with pytest.raises(StorageError, match=r"^savepoint: .*scheme 'gs'"):
        mounted.for_flink("gs://b/x", "savepoint")


def test_flink_job_configuration_reaches_s3_through_the_mount():
    conf = flink_configuration(
        parse("s3://sluice/flink/job-abc"),
        "job",
        JobOptions(),
        bounded=False,
        restore_from="s3://sluice/flink/job-abc/checkpoints/x/chk-4",
        jvm=JvmAccess(Path("/mnt/s3")),
    )
    assert conf["execution.checkpointing.dir"] == "file:///mnt/s3/sluice/flink/job-abc/checkpoints"
    assert conf["execution.checkpointing.savepoint-dir"] == (
        "file:///mnt/s3/sluice/flink/job-abc/savepoints"
    )
    assert conf["execution.state-recovery.path"] == (
        "file:///mnt/s3/sluice/flink/job-abc/checkpoints/x/chk-4"
    )
    native = flink_configuration(
        parse("s3://sluice/f"), "job", JobOptions(), bounded=True, restore_from=None
    )
    assert native["execution.checkpointing.dir"] == "s3://sluice/f/checkpoints"


def test_path_settings_take_s3_uris_under_the_mount_only():
    settings = load_settings(
        s3_mount_dir="/mnt/s3",
        history_dir="s3://sluice/history",
        offline_store_dir="s3://sluice/offline/",
        feast_registry="s3://sluice/registry.db",
    )
    assert settings.history_dir == Path("/mnt/s3/sluice/history")
    assert settings.offline_store_dir == Path("/mnt/s3/sluice/offline")
    assert unmounted(settings.feast_registry, Path(settings.s3_mount_dir)) == parse(
        "s3://sluice/registry.db"
    )
    with pytest.raises(SettingsError, match=r"offline_store_dir: .*needs s3_mount_dir"):
        load_settings(offline_store_dir="s3://sluice/offline")
    with pytest.raises(SettingsError, match=r"s3_mount_dir: .*is relative"):
        load_settings(s3_mount_dir="mnt")


@pytest.mark.integration  # a real FUSE mount (s3fs) of an S3 server
@pytest.mark.skipif(shutil.which("s3fs") is None, reason="s3fs is not installed")
def test_s3fs_mount_shows_the_bucket_both_ways(s3_store: S3Options, tmp_path: Path):
    """What `up --cluster` runs: written through the mount is an object in the bucket, and an
    object Python writes through S3 is a file under the mount."""
    settings = load_settings(
        state_dir=tmp_path,
        s3_endpoint=s3_store.endpoint,
        s3_access_key=s3_store.access_key,
        s3_secret_key=s3_store.secret_key,
    )
    ensure_bucket("s3://sluice/", s3_store)
    object_store.prepare_mount(settings)
    assert (object_store.passwd_file(settings).stat().st_mode & 0o777) == 0o600
    log = tmp_path / "s3fs.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(object_store.mount_command(settings), stderr=err)
    point = object_store.mount_point(settings)
    try:
        deadline = time.monotonic() + 20
        while object_store.probe_mount(settings) is not None and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert object_store.probe_mount(settings) is None
        with pytest.raises(StackError, match="already mounted"):
            object_store.prepare_mount(settings)
        (point / "flink" / "chk-1").mkdir(parents=True)
        (point / "flink" / "chk-1" / "_metadata.tmp").write_bytes(b"state")
        (point / "flink" / "chk-1" / "_metadata.tmp").rename(
            point / "flink" / "chk-1" / "_metadata"
        )
        fs, root = filesystem("s3://sluice/flink", s3_store)
        files = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        names = {i.path for i in files if i.type == pafs.FileType.File}
        assert names == {"sluice/flink/chk-1/_metadata"}
        with fs.open_output_stream("sluice/models/m/1/model.txt") as out:
            out.write(b"model")
        assert (point / "models" / "m" / "1" / "model.txt").read_bytes() == b"model"
    finally:
        object_store.unmount(point)
        proc.wait(timeout=10)
    assert not object_store.is_mounted(point)
    object_store.unmount(point)  # not mounted: nothing to do


def test_up_without_s3fs_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("infra.object_store.shutil.which", lambda name: None)
    with pytest.raises(StackError, match=r"s3fs is not installed: apt-get install -y s3fs"):
        object_store.prepare_mount(load_settings(state_dir=tmp_path))
    assert not object_store.passwd_file(load_settings(state_dir=tmp_path)).exists()


def test_down_forgets_a_dead_mount_record_and_unmounts_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A recorded s3fs whose pid is gone and whose point is not mounted: down drops the record
    and runs no fusermount (it never touches a mount it did not record)."""
    from infra.cluster import cluster_down
    from infra.stack import ProcessRecord, load_records, save_records

    settings = load_settings(state_dir=tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    record = ProcessRecord(dead.pid, "127.0.0.1", 9000, ["s3fs"], time.time(), "log", "s3fs")
    save_records(tmp_path, {object_store.MOUNT_COMPONENT: record}, "cluster.json")
    calls: list[list[str]] = []
    monkeypatch.setattr("infra.object_store.subprocess.run", lambda args, **_: calls.append(args))
    assert cluster_down(settings) == []
    assert load_records(tmp_path, "cluster.json") == {}
    assert calls == []
