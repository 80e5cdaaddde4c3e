"""A circuit breaker in front of the online store, so that a dead Redis costs microseconds.

Without one, every batch waits the full read timeout of a Redis that does not answer. The
breaker counts reads that failed because the store was slow or down
(feature_repo.errors.OnlineStoreUnavailableError), and:

- CLOSED: reads go through; ``failures`` of them failing in a row open it.
- OPEN: reads are refused at once (BreakerOpenError, an OnlineStoreUnavailableError, so callers
  handle it like any unavailable store) for ``open_s``.
- HALF_OPEN: after ``open_s``, one read is let through as a probe while others are still
  refused; it closes the breaker when it succeeds and opens it again when it fails. A probe
  that never reports back (its caller died) is given up after another ``open_s``.

So the predictor recovers by itself: within ``open_s`` plus one read of Redis returning.
Other errors (a value that cannot be decoded) are not the store's availability and do not
count. The clock is injected, so the tests drive time by hand.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from enum import StrEnum
from typing import Any

from feature_repo.errors import OnlineStoreUnavailableError
from feature_repo.online_store import OnlineRow
from features.definitions import FeatureView
from serving.features import FeatureReader

log = logging.getLogger("sluice.serving.breaker")


class BreakerState(StrEnum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


# The value of the state gauge (sluice_breaker_state): the higher, the less is let through.
STATE_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class BreakerOpenError(OnlineStoreUnavailableError):
    """The breaker is open: the store was not asked."""

    code = "breaker_open"


class CircuitBreaker:
    """Closed -> open after ``failures`` failures in a row; one probe after ``open_s``."""

    def __init__(
        self,
        failures: int,
        open_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        if failures < 1 or open_s <= 0:
            raise ValueError("need failures >= 1 and open_s > 0")
        self.failures = failures
        self.open_s = open_s
        self._clock = clock
        self._on_transition = on_transition
        self._lock = threading.Lock()  # batches report from executor threads
        self._state = BreakerState.CLOSED
        self._failed = 0  # failures in a row while closed
        self._since = clock()  # when the state (or the running probe) began

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """Whether a read may go to the store now (in HALF_OPEN: only the one probe)."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            now = self._clock()
            if now - self._since < self.open_s:
                return False  # open, or a probe is running
            # Open long enough, or a probe that never reported: let one read through.
            self._since = now
            self._move(BreakerState.HALF_OPEN)
            return True

    def success(self) -> None:
        with self._lock:
            self._failed = 0
            if self._state is not BreakerState.CLOSED:
                self._since = self._clock()
                self._move(BreakerState.CLOSED)

    def failure(self) -> None:
        with self._lock:
            if self._state is BreakerState.CLOSED:
                self._failed += 1
                if self._failed < self.failures:
                    return
            self._failed = 0
            self._since = self._clock()
            self._move(BreakerState.OPEN)

    def _move(self, to: BreakerState) -> None:
        before, self._state = self._state, to
        if before is to:
            return
        log.warning("online store breaker %s -> %s", before.value, to.value)
        if self._on_transition is not None:
            try:
                self._on_transition(before, to)
            except Exception:
                log.exception("breaker transition callback failed")


class GuardedReader:
    """A FeatureReader behind a CircuitBreaker: refused at once while it is open."""

    def __init__(self, reader: FeatureReader, breaker: CircuitBreaker) -> None:
        self.reader = reader
        self.breaker = breaker

    @contextlib.contextmanager
    def _rows_read(self) -> Iterator[None]:
        """Around one read of rows (blocking or on the loop): refused while the breaker is
        open; the store's unavailability is a failure, anything else reached the store."""
        if not self.breaker.allow():
            raise BreakerOpenError(
                f"the online store failed {self.breaker.failures} reads in a row; "
                f"not asked again for {self.breaker.open_s * 1000:g} ms"
            )
        try:
            yield
        except OnlineStoreUnavailableError:
            self.breaker.failure()
            raise
        except Exception:
            # Not the store's availability (a bad value): the read did reach the store.
            self.breaker.success()
            raise
        self.breaker.success()

    @contextlib.contextmanager
    def _progress_read(self) -> Iterator[bool]:
        """Around one read of the stream's progress: yields False (read nothing) unless the
        breaker is closed; the store's unavailability is a failure."""
        if self.breaker.state is not BreakerState.CLOSED:
            yield False
            return
        try:
            yield True
        except OnlineStoreUnavailableError:
            self.breaker.failure()
            raise

    def read_many(
        self,
        requests: Sequence[tuple[FeatureView, Sequence[str]]],
        *,
        as_of_ms: int | None = None,
    ) -> list[list[OnlineRow | None]]:
        with self._rows_read():
            return self.reader.read_many(requests, as_of_ms=as_of_ms)

    def read_progress(self, views: Sequence[FeatureView], max_age_ms: int = 0) -> dict[str, int]:
        """The stream's progress, only while the breaker is closed: otherwise the rows' read is
        refused (or probes the store) right after, and no progress is claimed."""
        with self._progress_read() as allowed:
            return self.reader.read_progress(views, max_age_ms) if allowed else {}

    @property
    def reads_async(self) -> bool:
        """The store reads on the event loop too (feature_repo/redis_wire.py)."""
        return bool(getattr(self.reader, "reads_async", False))

    async def read_many_async(
        self,
        requests: Sequence[tuple[FeatureView, Sequence[str]]],
        *,
        as_of_ms: int | None = None,
    ) -> list[list[OnlineRow | None]]:
        """read_many on the event loop, behind the same breaker."""
        reader: Any = self.reader  # a store whose reads_async is true
        with self._rows_read():
            rows: list[list[OnlineRow | None]] = await reader.read_many_async(
                requests, as_of_ms=as_of_ms
            )
            return rows

    async def read_progress_async(
        self, views: Sequence[FeatureView], max_age_ms: int = 0
    ) -> dict[str, int]:
        """read_progress on the event loop (only while the breaker is closed)."""
        reader: Any = self.reader
        with self._progress_read() as allowed:
            progress: dict[str, int] = (
                await reader.read_progress_async(views, max_age_ms) if allowed else {}
            )
            return progress

    def close(self) -> None:
        close = getattr(self.reader, "close", None)
        if close is not None:
            close()
