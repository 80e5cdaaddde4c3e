"""Bundle ends in PyFlink's thread mode: the flush of each Python operator instance, by name.

Sluice's functions flush their writers when a bundle ends (streaming/functions.py). In process
mode PyFlink reads the function's gauges then; in thread mode the JVM calls ``end_bundle`` in
the operator's interpreter (streaming/java/sluice/BundleEnds.java: before every checkpoint
barrier and every bundle time), with the name it gave the instance in the job parameter TOKEN.
Thread mode runs every operator's Python in one process, so the registry is keyed by that name,
and each call comes on the operator's own task thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from streaming.errors import StreamJobError

TOKEN = "sluice.bundle.token"  # BundleEnds.TOKEN

_flushes: dict[str, Callable[[], object]] = {}
_lock = threading.Lock()  # registrations come from several task threads


def register(token: str, flush: Callable[[], object]) -> None:
    with _lock:
        if token in _flushes:
            raise StreamJobError(f"bundle token {token!r} is registered twice")
        _flushes[token] = flush


def end_bundle(token: str) -> None:
    """The operator instance ``token`` finished a bundle: its flush, if it registered one (a
    function without writers does not); an exception fails the bundle and the checkpoint."""
    flush = _flushes.get(token)
    if flush is not None:
        flush()


def forget_bundle(token: str) -> None:
    """The operator instance closed."""
    with _lock:
        _flushes.pop(token, None)
