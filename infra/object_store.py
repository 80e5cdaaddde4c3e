"""The local S3-compatible object store of `sluice up --cluster`: moto in server mode.

moto keeps objects in memory: it stands in for a real store (SeaweedFS, MinIO, S3) on one
machine for demos and tests, and loses everything when stopped. Anything that speaks S3 at
``s3_endpoint`` serves the same purpose; nothing in Sluice depends on moto.
"""

from __future__ import annotations

import importlib.util
import sys
import urllib.error
import urllib.request

from core.errors import StackError
from core.settings import Settings
from core.uris import S3Options, ensure_bucket

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
