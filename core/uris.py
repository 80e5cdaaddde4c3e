"""Every storage location is a URI, ``file://`` or ``s3://``, resolved here and only here.

A setting may name a plain path (``data/history``: a local directory, made absolute) or a URI.
``parse`` turns either into a ``StorageUri``; from there each consumer asks for the form it
speaks:

- Python code (pyarrow, the archive, the model registry): ``filesystem(uri, s3)`` gives a
  ``pyarrow.fs.FileSystem`` and the path inside it, with the object store's endpoint and keys.
- The JVM engines: ``JvmAccess`` (from the ``s3_mount_dir`` setting) decides how they reach an
  ``s3://`` location. Without a mount, natively: Spark gets ``uri.for_spark()`` (``s3a://``) and
  ``spark_conf(s3)`` (``spark.hadoop.fs.s3a.*``; the workers need hadoop-aws and the AWS SDK),
  Flink gets ``uri.for_flink()`` (``s3://``) and ``flink_conf(s3)`` (the flink-s3-fs-hadoop
  plugin). With the buckets mounted at ``s3_mount_dir`` on every worker (s3fs, Mountpoint for
  S3, a CSI driver), both get ``file:///<s3_mount_dir>/<bucket>/<key>``, and
  ``JvmAccess.from_engine`` maps what an engine reports back to the ``s3://`` URI.
- Local paths: ``uri.local_path()``, which refuses an object-store URI with a clear error;
  ``mounted_path`` gives the file path of an ``s3://`` location under a mount.

The object store's endpoint and keys come from ``S3Options``; ``S3Options.from_settings``
reads ``s3_endpoint``, ``s3_access_key``, ``s3_secret_key`` and ``s3_region``. An empty
endpoint means AWS itself (or whatever the AWS_* environment of the process says).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from core.errors import StorageError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from core.settings import Settings

SCHEMES = ("file", "s3")
# S3 bucket names: 3-63 lower-case letters, digits, dots and hyphens.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class StorageUri:
    """A parsed location: ``scheme`` file (``path`` absolute) or s3 (``bucket`` + key ``path``)."""

    scheme: str
    path: str
    bucket: str = ""

    def __str__(self) -> str:
        if self.scheme == "file":
            return Path(self.path).as_uri()
        return f"s3://{self.bucket}/{self.path}".rstrip("/")

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    def join(self, *parts: str | int) -> StorageUri:
        """A location under this one; each part is one or more ``/``-separated names."""
        names = [str(p).strip("/") for p in parts if str(p).strip("/")]
        for name in names:
            if any(piece in ("", ".", "..") for piece in name.split("/")):
                raise StorageError(f"{self}: {name!r} is not a relative name under it")
        path = "/".join([self.path.rstrip("/"), *names]) if self.path else "/".join(names)
        return StorageUri(self.scheme, path, self.bucket)

    def local_path(self, what: str = "this location") -> Path:
        """The local directory of a file:// URI; an object-store URI is an error for ``what``."""
        if not self.is_local:
            raise StorageError(
                f"{what} is {self}, but this step reads a local path only: use a file:// URI "
                "or a plain directory for it"
            )
        return Path(self.path)

    def for_python(self) -> str:
        """The path inside the filesystem that ``filesystem`` returns."""
        return self.path if self.is_local else f"{self.bucket}/{self.path}".rstrip("/")

    def for_spark(self) -> str:
        """The URI as Hadoop names it: file:///abs or s3a://bucket/key."""
        return str(self) if self.is_local else f"s3a://{self.bucket}/{self.path}".rstrip("/")

    def for_flink(self) -> str:
        """The URI as Flink's filesystems name it: file:///abs or s3://bucket/key."""
        return str(self)


def parse(value: str | Path | StorageUri, field: str = "path") -> StorageUri:
    """A plain path (made absolute), ``file:///abs`` (or Flink's ``file:/abs``) or
    ``s3://bucket/key`` as a StorageUri.

    Anything else is a StorageError naming ``field`` (the setting) and what is expected."""
    if isinstance(value, StorageUri):
        return value
    text = str(value).strip()
    if not text:
        raise StorageError(f"{field}: empty (expected a directory, file:///dir or s3://bucket/dir)")
    if "://" not in text and not text.lower().startswith("file:/"):
        return StorageUri("file", str(Path(text).expanduser().resolve()))
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(
                f"{field}: {text!r} names host {parsed.netloc!r}; write file:///absolute/path"
            )
        return StorageUri("file", str(Path(parsed.path or "/").resolve()))
    if scheme in ("s3", "s3a"):
        bucket = parsed.netloc
        if not _BUCKET.match(bucket):
            raise StorageError(
                f"{field}: {text!r}: {bucket!r} is not a bucket name "
                "(3-63 lower-case letters, digits, dots and hyphens)"
            )
        if parsed.query or parsed.fragment:
            raise StorageError(f"{field}: {text!r}: no ?query or #fragment (set s3_* settings)")
        return StorageUri("s3", parsed.path.strip("/"), bucket)
    raise StorageError(
        f"{field}: {text!r}: scheme {parsed.scheme!r} is not supported (expected file or s3)"
    )


@dataclass(frozen=True)
class S3Options:
    """Where the object store is and how to sign requests to it."""

    endpoint: str = ""  # http://127.0.0.1:9000; empty: AWS (or the AWS_* environment)
    access_key: str = ""
    secret_key: str = ""
    region: str = "us-east-1"

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Options:
        return cls(
            endpoint=settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            region=settings.s3_region,
        )

    def __repr__(self) -> str:  # never the secret
        return f"S3Options(endpoint={self.endpoint!r}, region={self.region!r})"

    @property
    def secure(self) -> bool:
        return not self.endpoint.startswith("http://")

    @property
    def host_port(self) -> str:
        """The endpoint without its scheme (pyarrow's endpoint_override)."""
        return self.endpoint.split("://", 1)[-1].rstrip("/")

    def environment(self) -> dict[str, str]:
        """AWS_* variables that hand these options to tools that read only the environment."""
        env = {"AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region}
        if self.endpoint:
            env |= {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL_S3": self.endpoint}
        if self.access_key:
            env |= {"AWS_ACCESS_KEY_ID": self.access_key}
        if self.secret_key:
            env |= {"AWS_SECRET_ACCESS_KEY": self.secret_key}
        return env


def _default_options() -> S3Options:
    from core.settings import get_settings

    return S3Options.from_settings(get_settings())


def filesystem(
    value: str | Path | StorageUri, s3: S3Options | None = None, field: str = "path"
) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for the location and the path of the location inside it.

    ``s3`` defaults to the process's settings (``get_settings()``)."""
    import pyarrow.fs as pafs

    uri = parse(value, field)
    if uri.is_local:
        return pafs.LocalFileSystem(), uri.for_python()
    options = s3 if s3 is not None else _default_options()
    kwargs: dict[str, Any] = {"region": options.region, "allow_bucket_creation": True}
    if options.endpoint:
        kwargs |= {
            "endpoint_override": options.host_port,
            "scheme": "https" if options.secure else "http",
        }
    if options.access_key or options.secret_key:
        kwargs |= {"access_key": options.access_key, "secret_key": options.secret_key}
    try:
        return pafs.S3FileSystem(**kwargs), uri.for_python()
    except (OSError, ValueError) as exc:
        raise StorageError(f"{field}: cannot open {uri}: {exc}") from None


def ensure_bucket(value: str | Path | StorageUri, s3: S3Options | None = None) -> None:
    """Create the bucket of an s3:// location if it is missing (nothing to do for file://)."""
    uri = parse(value)
    if uri.is_local:
        Path(uri.path).mkdir(parents=True, exist_ok=True)
        return
    fs, _ = filesystem(uri, s3)
    try:
        fs.create_dir(uri.bucket, recursive=False)
    except OSError as exc:
        if "already" not in str(exc).lower() and "exists" not in str(exc).lower():
            raise StorageError(f"cannot create bucket {uri.bucket!r}: {exc}") from None


def exists(value: str | Path | StorageUri, s3: S3Options | None = None) -> bool:
    """Whether a file or directory is at the location."""
    import pyarrow.fs as pafs

    fs, path = filesystem(value, s3)
    try:
        return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)
    except OSError as exc:
        raise StorageError(f"cannot reach {parse(value)}: {exc}") from None


def spark_conf(s3: S3Options) -> dict[str, str]:
    """Spark settings for s3a:// (Hadoop's S3A client) against this store."""
    conf = {
        "spark.hadoop.fs.s3a.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        "spark.hadoop.fs.s3a.path.style.access": "true" if s3.endpoint else "false",
        "spark.hadoop.fs.s3a.endpoint.region": s3.region,
    }
    if s3.endpoint:
        conf |= {
            "spark.hadoop.fs.s3a.endpoint": s3.endpoint,
            "spark.hadoop.fs.s3a.connection.ssl.enabled": str(s3.secure).lower(),
        }
    if s3.access_key:
        conf |= {
            "spark.hadoop.fs.s3a.access.key": s3.access_key,
            "spark.hadoop.fs.s3a.secret.key": s3.secret_key,
            "spark.hadoop.fs.s3a.aws.credentials.provider": (
                "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider"
            ),
        }
    return conf


def flink_conf(s3: S3Options) -> dict[str, str]:
    """Flink settings for s3:// (the flink-s3-fs-hadoop plugin) against this store."""
    conf: dict[str, str] = {}
    if s3.endpoint:
        conf |= {"s3.endpoint": s3.endpoint, "s3.path.style.access": "true"}
    if s3.access_key:
        conf |= {"s3.access-key": s3.access_key, "s3.secret-key": s3.secret_key}
    return conf


def is_object_store(value: str | Path | StorageUri) -> bool:
    return not parse(value).is_local


def child_environment(s3: S3Options) -> dict[str, str]:
    """The environment of a child process (engine worker, subprocess) with the store's keys."""
    return {**os.environ, **s3.environment()}


def mount_dir(value: str | Path, field: str = "s3_mount_dir") -> Path | None:
    """The directory where buckets are mounted (``<dir>/<bucket>/...``); None when empty.

    It must be an absolute local path, not a URI: a StorageError naming ``field`` otherwise."""
    text = str(value).strip()
    if not text:
        return None
    if "://" in text or text.lower().startswith("file:"):
        raise StorageError(
            f"{field}: {text!r} is a URI; expected the absolute directory where the object "
            "store's buckets are mounted (<dir>/<bucket>/<key>), e.g. /mnt/s3"
        )
    path = Path(text).expanduser()
    if not path.is_absolute():
        raise StorageError(
            f"{field}: {text!r} is relative; every worker mounts the buckets at the same "
            "absolute directory, e.g. /mnt/s3"
        )
    return Path(os.path.normpath(path))


def mounted_path(value: str | Path | StorageUri, mount: Path, field: str = "path") -> Path:
    """The file path of a location under a bucket mount: ``<mount>/<bucket>/<key>`` for
    ``s3://bucket/key``; a file:// location is its own path."""
    uri = parse(value, field)
    if uri.is_local:
        return Path(uri.path)
    return mount.joinpath(uri.bucket, *[p for p in uri.path.split("/") if p])


def unmounted(value: str | Path | StorageUri, mount: Path) -> StorageUri:
    """The inverse of ``mounted_path``: a path under ``<mount>/<bucket>/`` as the ``s3://``
    URI it mounts; any other location unchanged."""
    uri = parse(value)
    if not uri.is_local:
        return uri
    try:
        parts = Path(uri.path).relative_to(mount).parts
    except ValueError:
        return uri
    if not parts or not _BUCKET.match(parts[0]):
        return uri
    return StorageUri("s3", "/".join(parts[1:]), parts[0])


@dataclass(frozen=True)
class JvmAccess:
    """How Spark and Flink reach ``s3://`` locations: natively (``mount`` None: the S3 jars are
    on the workers) or through the buckets mounted at ``mount`` on every worker."""

    mount: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> JvmAccess:
        return cls(mount_dir(settings.s3_mount_dir))

    def for_spark(self, value: str | Path | StorageUri, field: str = "path") -> str:
        uri = parse(value, field)
        if self.mount is not None and not uri.is_local:
            return mounted_path(uri, self.mount).as_uri()
        return uri.for_spark()

    def for_flink(self, value: str | Path | StorageUri, field: str = "path") -> str:
        uri = parse(value, field)
        if self.mount is not None and not uri.is_local:
            return mounted_path(uri, self.mount).as_uri()
        return uri.for_flink()

    def from_engine(self, value: str | Path | StorageUri) -> StorageUri:
        """A location an engine reported (``file:/<mount>/b/k``, ``s3a://b/k``) as Sluice
        names it (``s3://b/k``)."""
        uri = parse(value)
        return uri if self.mount is None else unmounted(uri, self.mount)
