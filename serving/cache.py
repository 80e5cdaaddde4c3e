"""Prediction cache: (model, version, feature vector) -> prediction, LRU bounded in bytes.

The key is the model's input vector as the batch built it (after the feature join), so a fresh
feature value is a new key and a cached answer is never staler than the features it was made
from. Only rows missing from the cache go to the model. Identical keys in flight share one
computation (single flight): within a batch they are predicted once, and a batch that meets a
key another thread is computing waits for that thread's value instead of computing it again.
No deadlock: a thread computes all of its own keys before it waits for anyone else's.

Bytes are counted per entry as the key's size plus a fixed estimate of the value and the
dictionary's bookkeeping (ENTRY_OVERHEAD); that is the figure kept under ``max_bytes``.

Counts (exported by CacheCollector as sluice_cache_*): hits, misses (rows computed here),
shared (rows that waited for an identical computation), evictions, bytes and entries.
Every looked-up row is exactly one of hit, miss or shared.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np
import numpy.typing as npt
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

Matrix = npt.NDArray[np.float64]
# A float (24 bytes) plus an OrderedDict entry (hash table slot and linked-list node, ~100).
ENTRY_OVERHEAD = 128


class PredictionCache:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._items: OrderedDict[bytes, float] = OrderedDict()
        # Keys being computed -> the future their waiters wait on: None until a second thread
        # asks for the key (the usual miss has no waiter, and a Future with its condition
        # variable is a measurable part of a miss's cost).
        self._inflight: dict[bytes, Future[float] | None] = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.shared = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def predict(
        self, model: str, version: int, matrix: Matrix, compute: Callable[[Matrix], Matrix]
    ) -> Matrix:
        """Predictions of ``matrix``'s rows: cached ones from the cache, the rest from
        ``compute`` (called at most once, on the rows nobody has or is computing)."""
        prefix = f"{model}\0{version}\0".encode()
        keys = [prefix + row.tobytes() for row in np.ascontiguousarray(matrix, dtype=np.float64)]
        out = np.empty(len(keys), dtype=np.float64)
        mine: dict[bytes, list[int]] = {}  # computed here: key -> rows
        waits: dict[bytes, tuple[Future[float], list[int]]] = {}  # another thread's
        with self._lock:
            for index, key in enumerate(keys):
                if key in mine:
                    mine[key].append(index)
                    self.shared += 1
                elif key in waits:
                    waits[key][1].append(index)
                    self.shared += 1
                elif (value := self._items.get(key)) is not None:
                    self._items.move_to_end(key)
                    out[index] = value
                    self.hits += 1
                elif key in self._inflight:
                    running = self._inflight[key]
                    if running is None:
                        running = self._inflight[key] = Future()
                    waits[key] = (running, [index])
                    self.shared += 1
                else:
                    self._inflight[key] = None
                    mine[key] = [index]
                    self.misses += 1
        if mine:
            self._compute(matrix, mine, out, compute)
        for future, indices in waits.values():
            out[indices] = future.result()
        return out

    def _compute(
        self,
        matrix: Matrix,
        mine: dict[bytes, list[int]],
        out: Matrix,
        compute: Callable[[Matrix], Matrix],
    ) -> None:
        try:
            values = compute(matrix[[indices[0] for indices in mine.values()]])
        except BaseException as exc:  # waiters get the same error; nothing is cached
            with self._lock:
                futures = [self._inflight.pop(key) for key in mine]
            for future in futures:
                if future is not None:
                    future.set_exception(exc)
            raise
        with self._lock:
            done: list[tuple[Future[float], float]] = []
            for (key, indices), value in zip(mine.items(), values, strict=True):
                out[indices] = value
                waited = self._inflight.pop(key)
                if waited is not None:
                    done.append((waited, float(value)))
                self._store(key, float(value))
        for future, value in done:
            future.set_result(value)

    def _store(self, key: bytes, value: float) -> None:
        size = sys.getsizeof(key) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= size
        self._items[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            evicted, _ = self._items.popitem(last=False)
            self.bytes -= sys.getsizeof(evicted) + ENTRY_OVERHEAD
            self.evictions += 1


class CacheCollector(Collector):
    """The cache's counts as Prometheus metrics, read when /metrics is scraped (nothing on the
    request path). The monitoring dashboard reads families with "cache" in their names: hits
    and misses give its hit rate."""

    def __init__(self, cache: PredictionCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        c = self.cache
        yield CounterMetricFamily("sluice_cache_hits", "Rows answered from the cache", c.hits)
        yield CounterMetricFamily(
            "sluice_cache_misses", "Rows not in the cache: predicted by the model", c.misses
        )
        yield CounterMetricFamily(
            "sluice_cache_shared",
            "Rows that shared an identical in-flight computation (single flight)",
            c.shared,
        )
        yield CounterMetricFamily(
            "sluice_cache_evictions", "Entries evicted to stay within the bytes bound", c.evictions
        )
        yield GaugeMetricFamily("sluice_cache_bytes", "Bytes held (estimated)", c.bytes)
        yield GaugeMetricFamily("sluice_cache_entries", "Entries held", len(c))
