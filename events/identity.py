"""Event identity: the same event has the same id in Python, Spark and Flink.

An event's id is the md5 hex digest of the canonical JSON value that ingest writes to
``events.<source>``. Ingest is deterministic (declared fields in declared order, timestamps as
epoch milliseconds), so an at-least-once replay of a raw record after an ingest crash yields the
same bytes and the same id, while two different events differ in some field and so in their
bytes. md5, not a stronger hash: it is a builtin of Spark SQL (``md5(value)``) and Flink SQL
(``MD5(value)``), so every engine can compute the id from the Kafka value without Python. It
names events; it is not a security boundary.
"""

from __future__ import annotations

import hashlib

# Hex digits of an id (md5: 128 bits).
EVENT_ID_LENGTH = 32


def event_id(value: bytes) -> str:
    """The id of the event whose canonical JSON value is ``value``."""
    return hashlib.md5(value, usedforsecurity=False).hexdigest()
