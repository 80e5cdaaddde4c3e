"""Sluice settings -> Feast configuration, in one place.

Python code builds the RepoConfig from Settings (repo_config); the `feast` CLI run in
feature_repo/ reads feature_store.yaml instead, whose ${VARIABLES} Feast fills in from the
environment (os.path.expandvars, Feast 0.67 repo_config.load_repo_config). feast_env gives those
variables for given settings; `sluice features env` prints them as shell exports. A test checks
that both paths produce the same configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from core.settings import Settings
from feature_repo.errors import FeatureRepoError

if TYPE_CHECKING:
    from feast import FeatureStore, RepoConfig

REPO_DIR = Path(__file__).resolve().parent
# Entity key serialization 3 is the only one Feast 0.67 does not deprecate; codec.py follows it.
ENTITY_KEY_SERIALIZATION_VERSION = 3
REDIS_ENV = "SLUICE_FEAST_REDIS_CONNECTION"


def feast_redis_connection(redis_url: str) -> str:
    """redis://[user:password@]host:port/db as Feast's "host:port,db=N,password=..." string."""
    parsed = urlparse(redis_url)
    if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
        raise FeatureRepoError(f"redis_url: {redis_url!r} is not a redis:// URL")
    parts = [f"{parsed.hostname}:{parsed.port or 6379}"]
    db = parsed.path.strip("/")
    parts.append(f"db={int(db) if db else 0}")
    if parsed.username:
        parts.append(f"username={unquote(parsed.username)}")
    if parsed.password:
        password = unquote(parsed.password)
        if "," in password:
            # Feast splits its connection string on commas.
            raise FeatureRepoError("redis_url: Feast cannot use a Redis password with a comma")
        parts.append(f"password={password}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def feast_env(settings: Settings) -> dict[str, str]:
    """The environment feature_store.yaml and feature_repo/definitions.py need for settings."""
    return {
        "SLUICE_FEAST_PROJECT": settings.feast_project,
        "SLUICE_FEAST_REGISTRY": str(settings.feast_registry.resolve()),
        "SLUICE_OFFLINE_STORE_DIR": str(settings.offline_store_dir.resolve()),
        "SLUICE_DEFINITIONS_MODULE": settings.definitions_module,
        REDIS_ENV: feast_redis_connection(settings.redis_url),
    }


def repo_config(settings: Settings, *, registry_cache_ttl_s: int = 60) -> RepoConfig:
    """The RepoConfig that feature_store.yaml describes, built from settings directly."""
    from feast import RepoConfig
    from feast.repo_config import RegistryConfig

    return RepoConfig(
        project=settings.feast_project,
        provider="local",
        registry=RegistryConfig(
            path=str(settings.feast_registry.resolve()), cache_ttl_seconds=registry_cache_ttl_s
        ),
        online_store={
            "type": "redis",
            "connection_string": feast_redis_connection(settings.redis_url),
        },
        offline_store={"type": "file"},
        entity_key_serialization_version=ENTITY_KEY_SERIALIZATION_VERSION,
        repo_path=REPO_DIR,
    )


def feature_store(settings: Settings, *, registry_cache_ttl_s: int = 60) -> FeatureStore:
    from feast import FeatureStore

    settings.feast_registry.parent.mkdir(parents=True, exist_ok=True)
    config = repo_config(settings, registry_cache_ttl_s=registry_cache_ttl_s)
    return FeatureStore(config=config)
