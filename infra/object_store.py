"""The local S3-compatible object store of `sluice up --cluster`: moto in server mode, and
the s3fs mount of its bucket through which the JVM engines reach it.

moto keeps objects in memory: it stands in for a real store (SeaweedFS, MinIO, S3) on one
machine for demos and tests, and loses everything when stopped. Anything that speaks S3 at
``s3_endpoint`` serves the same purpose; nothing in Sluice depends on moto.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from core.errors import StackError
from core.settings import Settings
from core.uris import S3Options, ensure_bucket, mount_dir

DEFAULT_BUCKET = "sluice"
# moto accepts any key pair; these are what `sluice up --cluster` tells clients to use.
LOCAL_ACCESS_KEY = "sluice"
LOCAL_SECRET_KEY = "sluice-local-secret"


def command(host: str, port: int) -> list[str]:
    if importlib.util.find_spec("moto") is None:
        raise StackError("the object store needs moto: pip install 'moto[s3]' flask flask-cors")
    return [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]


def endpoint(settings: Settings) -> tuple[str, int]:
    """Where the object store listens: s3_endpoint's host and port, else loopback."""
    if settings.s3_endpoint:
        from urllib.parse import urlparse

        parsed = urlparse(settings.s3_endpoint)
        return parsed.hostname or "127.0.0.1", parsed.port or 80
    return "127.0.0.1", settings.cluster_object_store_port


def options(settings: Settings) -> S3Options:
    """The S3 options that reach the store `up --cluster` runs (settings' keys win)."""
    host, port = endpoint(settings)
    return S3Options(
        endpoint=settings.s3_endpoint or f"http://{host}:{port}",
        access_key=settings.s3_access_key or LOCAL_ACCESS_KEY,
        secret_key=settings.s3_secret_key or LOCAL_SECRET_KEY,
        region=settings.s3_region,
    )


def probe(host: str, port: int, timeout_s: float) -> str | None:
    """None when the store answers S3's ListBuckets, else why not."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=timeout_s) as response:
            body = response.read(4096)
    except (urllib.error.URLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if b"ListAllMyBucketsResult" not in body:
        return "answered, but not as an S3 endpoint"
    return None


def create_bucket(settings: Settings, bucket: str = DEFAULT_BUCKET) -> None:
    ensure_bucket(f"s3://{bucket}/", options(settings))


# The bucket mount: how the JVM engines reach the store without S3 jars (core/uris.JvmAccess).
MOUNT_COMPONENT = "object-store-mount"


def mount_root(settings: Settings) -> Path:
    """Where `up --cluster` mounts buckets: s3_mount_dir, else <state_dir>/cluster/s3."""
    return mount_dir(settings.s3_mount_dir) or settings.state_dir / "cluster" / "s3"


def mount_point(settings: Settings, bucket: str = DEFAULT_BUCKET) -> Path:
    return mount_root(settings) / bucket


def mount_command(settings: Settings, bucket: str = DEFAULT_BUCKET) -> list[str]:
    """s3fs in the foreground (so its pid is the mount's), tuned for consistency over speed.

    A one-second stat cache and no cache of missing objects: what one process has just written
    (Python through S3, Flink through the mount) is what the next one sees. The key pair goes
    in a 0600 file beside the cluster's logs, never on the command line."""
    s3 = options(settings)
    tuning = [
        f"passwd_file={passwd_file(settings)}",
        f"url={s3.endpoint}",
        f"endpoint={s3.region}",
        "use_path_request_style",
        "stat_cache_expire=1",
        "complement_stat",
        "dbglevel=warn",
    ]
    s3fs = shutil.which("s3fs") or "s3fs"  # prepare_mount says how to install it
    return [s3fs, bucket, str(mount_point(settings, bucket)), "-f", "-o", ",".join(tuning)]


def passwd_file(settings: Settings) -> Path:
    return settings.state_dir / "cluster" / "s3fs-passwd"


def prepare_mount(settings: Settings, bucket: str = DEFAULT_BUCKET) -> None:
    """Write s3fs's key file (0600) and create the mount point; refuse a mount already there."""
    if shutil.which("s3fs") is None:
        raise StackError(
            "s3fs is not installed: apt-get install -y s3fs (the Flink and Spark workers reach "
            "the object store through its mount of the bucket; see docs/deployment.md)"
        )
    point = mount_point(settings, bucket)
    if is_mounted(point):
        raise StackError(
            f"something is already mounted at {point}: unmount it (fusermount -u) or set "
            "s3_mount_dir to another directory"
        )
    s3 = options(settings)
    secrets = passwd_file(settings)
    secrets.parent.mkdir(parents=True, exist_ok=True)
    secrets.touch(mode=0o600)
    secrets.chmod(0o600)
    secrets.write_text(f"{s3.access_key}:{s3.secret_key}\n")
    point.mkdir(parents=True, exist_ok=True)


def is_mounted(point: Path) -> bool:
    """Whether the kernel lists a mount at ``point`` (also one whose daemon died, which
    os.path.ismount cannot stat)."""
    target = os.path.normpath(os.path.abspath(point))
    try:
        with open("/proc/self/mounts") as mounts:
            return any(
                line.split()[1].replace("\\040", " ") == target for line in mounts if line.strip()
            )
    except OSError:
        return os.path.ismount(point)


def probe_mount(settings: Settings, bucket: str = DEFAULT_BUCKET) -> str | None:
    """None when the bucket is mounted and lists, else why not."""
    point = mount_point(settings, bucket)
    if not is_mounted(point):
        return f"nothing is mounted at {point}"
    try:
        os.listdir(point)
    except OSError as exc:
        return f"{point} is mounted but does not list: {exc.strerror or exc}"
    return None


def unmount(point: Path) -> None:
    """Unmount a FUSE mount (lazily if it is busy or its daemon died); only if mounted."""
    if not is_mounted(point):
        return
    for flags in (["-u"], ["-uz"]):
        done = subprocess.run(
            ["fusermount", *flags, str(point)], capture_output=True, text=True, check=False
        )
        if done.returncode == 0 or not is_mounted(point):
            return
    raise StackError(f"cannot unmount {point}: {done.stderr.strip() or done.returncode}")
