"""Structured logging: one JSON object per line on stderr, with the `extra=` fields inlined.

Secrets never reach a log line: URL passwords (``redis://user:pw@host``) and ``password=``,
``secret=`` or ``token=`` values are replaced by *** in every line, whatever logged them.
librdkafka's own lines (logger ``sluice.librdkafka``, see core/settings.py) and Python warnings
of libraries show from level INFO on: at the default WARNING, a broker that does not answer is
one typed error, not a screenful of connection retries.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import orjson

from core.settings_values import LIBRDKAFKA_LOGGER, MASK, is_secret_key

# Attributes every LogRecord has; anything else came from `extra=` and belongs in the line.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# user:password@ in a URL, and password=... style pairs (Feast's Redis connection string,
# librdkafka and JAAS settings).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s\"']*:)[^@\s\"']+@")
_PAIR_SECRET = re.compile(
    r"(?P<head>(?:password|secret|token)[\"']?\s*[=:]\s*[\"']?)[^,;\s\"'&)]+", re.IGNORECASE
)


def scrub(text: str) -> str:
    """The text with URL passwords and password=/secret=/token= values replaced by ***."""
    text = _URL_PASSWORD.sub(rf"\g<head>{MASK}@", text)
    return _PAIR_SECRET.sub(rf"\g<head>{MASK}", text)


def _masked(value: Any) -> Any:
    """Mappings (kafka_config and the like) with the values of secret keys masked."""
    if isinstance(value, dict):
        return {k: MASK if is_secret_key(str(k)) else _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({k: _masked(v) for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return scrub(orjson.dumps(line, default=str).decode())


def configure_logging(level: str = "WARNING") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("sluice")
    root.handlers[:] = [handler]
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root.setLevel(numeric)
    root.propagate = False
    # librdkafka reports every failed connection attempt as an error, and libraries warn about
    # their own dependencies (Python warnings): detail, shown from INFO on.
    quiet = numeric > logging.INFO
    logging.getLogger(LIBRDKAFKA_LOGGER).setLevel(logging.CRITICAL + 1 if quiet else numeric)
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.handlers[:] = [handler]
    warnings_log.setLevel(logging.CRITICAL + 1 if quiet else numeric)
    warnings_log.propagate = False
