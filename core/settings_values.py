"""Setting values as people write them, and as they may be shown: list and mapping parsing,
secret masking, and the constants those need (core/settings.py builds on them)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

LIBRDKAFKA_LOGGER = "sluice.librdkafka"
TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
# kafka_config keys whose values are secrets (librdkafka: sasl.password, ssl.key.password,
# ssl.keystore.password, ssl.key.pem, sasl.oauthbearer.client.secret, ...; Java: *.jaas.config).
_SECRET_KEY = re.compile(r"password|secret|token|jaas|credential|\.pem$|oauthbearer\.config", re.I)
# Where "key=value,key2=value2" splits: at a comma followed by the next "key=".
_NEXT_PAIR = re.compile(r",\s*(?=[A-Za-z0-9_.-]+\s*=)")
MASK = "***"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# An API token: printable ASCII without spaces or commas (commas separate tokens), long enough
# not to be guessed.
TOKEN_TEXT = re.compile(r"^[!-+\--~]{16,512}$")
# Data paths default under the checkout, so `sluice` and `feast` (run in feature_repo/) agree.
DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sluice"


def mask_url(url: str) -> str:
    """The URL with its password (if any) replaced by ***: safe to print and log."""
    parsed = urlparse(url)
    if not parsed.password:
        return url
    user = parsed.username or ""
    host = parsed.netloc.rpartition("@")[2]
    return parsed._replace(netloc=f"{user}:{MASK}@{host}").geturl()


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def mask_kafka_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """kafka_config with secret values (passwords, keys, tokens) replaced by ***."""
    return {k: MASK if is_secret_key(k) else v for k, v in config.items()}


def parse_list(value: Any) -> Any:
    """One name, names separated by commas, or a JSON list; anything else is left to pydantic."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON list ({exc.msg} at character {exc.pos})") from None
    return [part.strip() for part in text.split(",") if part.strip()]


def scalar_text(value: Any) -> Any:
    """A JSON/YAML scalar as librdkafka's text (True -> "true"); other values unchanged."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


def parse_mapping(value: Any) -> Any:
    """``key=value,key2=value2`` or a JSON object. Never echoes the text: it may hold secrets."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return {}
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"not a JSON object ({exc.msg} at character {exc.pos}); write a JSON object "
                    "or key=value,key2=value2"
                ) from None
        else:
            pairs: dict[str, str] = {}
            for n, item in enumerate(_NEXT_PAIR.split(text), 1):
                key, sep, val = item.partition("=")
                if not sep or not key.strip():
                    raise ValueError(
                        f"item {n} is not key=value; write key=value,key2=value2 or a JSON object"
                    )
                pairs[key.strip()] = val.strip()
            return pairs
    if isinstance(value, dict):
        return {k: scalar_text(v) for k, v in value.items()}
    return value
