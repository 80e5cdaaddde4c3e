"""A local write-ahead log for the prediction log: records survive a dead broker and a crash.

Every record is appended here (one ``write()`` of one frame, in the request's thread) before
anything else happens to it; a sender reads the log in order and hands records to Kafka; the
broker's acknowledgements advance a committed offset. What is past the committed offset is
sent again after a restart, in order, before any new record.

Durability, precisely:

- A crash of the server process (SIGKILL, OOM kill, a bug) loses no record that was appended:
  ``write()`` hands the bytes to the kernel, which keeps them in the page cache and writes them
  out although the process is gone. The predictor appends before it answers, so every answered
  request's record survives a process crash.
- A crash of the machine (power, kernel panic) loses at most the records appended since the
  last fsync: ``fsync_interval_s`` (setting ``prediction_log_fsync_ms``, default 100 ms) plus
  the time one fsync takes. At 300 requests/s that is about 30 records. An interval of 0 syncs
  every append, in the request's thread (durable, and slower).
- Records sent again after a restart may already be in the topic (delivered, but their
  acknowledgement not yet committed here when the process died, at most one fsync interval of
  acknowledgements): these are duplicates with the same key (prediction_id), which consumers
  drop. They are counted as ``replayed``, an upper bound on such duplicates.

On disk: ``<dir>/<offset>.wal`` segment files, named by the logical offset of their first byte;
a frame is ``length:u32 crc32:u32 topic_len:u16 key_len:u32 topic key value`` (little endian;
the CRC covers everything after itself). A torn or corrupt frame (the tail of a write cut by a
crash) ends the log: it and anything after it are truncated at open, never replayed as
garbage. ``COMMIT`` holds the committed offset (with its own CRC; a lost or stale one only
means more records are sent again). Segments wholly below the committed offset are deleted.
The log is bounded by ``max_bytes`` on disk: an append that does not fit is refused (the caller
counts it as dropped) rather than blocking a request. ``LOCK`` (flock) keeps a second process
off the same directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from serving.errors import PredictionLogError

log = logging.getLogger("sluice.serving.wal")

_HEADER = struct.Struct("<II")  # payload length, crc32 of the payload
_PAYLOAD = struct.Struct("<HI")  # topic length, key length; then topic, key, value
_COMMIT = struct.Struct("<QI")  # committed offset, crc32 of the offset's 8 bytes
_MAX_FRAME = 64 * 1024 * 1024  # a longer length field is corruption, not a record
_SUFFIX = ".wal"
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    """One record read back: its offset (of its frame) and the offset after it."""

    offset: int
    end: int
    topic: str
    key: bytes
    value: bytes


def encode_frame(topic: str, key: bytes, value: bytes) -> bytes:
    name = topic.encode()
    payload = _PAYLOAD.pack(len(name), len(key)) + name + key + value
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode_frames(buffer: bytes, base: int) -> tuple[list[Entry], int, bool]:
    """Whole, valid frames at the start of ``buffer`` (whose first byte is offset ``base``):
    the entries, the bytes they take, and whether a corrupt frame stopped the scan (a frame
    merely cut short by the end of the buffer is not corrupt: the next read completes it)."""
    entries: list[Entry] = []
    pos = 0
    view = memoryview(buffer)
    while len(buffer) - pos >= _HEADER.size:
        length, crc = _HEADER.unpack_from(buffer, pos)
        if length < _PAYLOAD.size or length > _MAX_FRAME:
            return entries, pos, True
        end = pos + _HEADER.size + length
        if end > len(buffer):
            break
        payload = view[pos + _HEADER.size : end]
        if zlib.crc32(payload) != crc:
            return entries, pos, True
        topic_len, key_len = _PAYLOAD.unpack_from(payload)
        start = _PAYLOAD.size
        if start + topic_len + key_len > length:
            return entries, pos, True
        topic = bytes(payload[start : start + topic_len]).decode(errors="replace")
        key = bytes(payload[start + topic_len : start + topic_len + key_len])
        value = bytes(payload[start + topic_len + key_len :])
        entries.append(Entry(base + pos, base + end, topic, key, value))
        pos = end
    return entries, pos, False


class WriteAheadLog:
    """Segment files in one directory; append from any thread, read from one sender thread."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 1 << 30,
        fsync_interval_s: float = 0.1,
        segment_bytes: int | None = None,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.fsync_interval_s = fsync_interval_s
        self.segment_bytes = segment_bytes or max(64 * 1024, min(64 << 20, max_bytes // 8))
        self._lock = threading.Lock()  # appends, rotation, the segment list
        # One sync at a time (the background loop's and a caller's): when sync() returns, what
        # it found committed is persisted and its segments are gone, not half-way in another.
        self._sync_lock = threading.Lock()
        self._segments: list[int] = []  # start offsets, ascending; the last is being written
        self._fd = -1  # the last segment, open for append
        self._end = 0  # logical offset after the last whole frame
        self._committed = 0
        self._persisted = -1  # the committed offset as last written to COMMIT
        self._synced = 0  # logical offset up to which data is fsynced
        self._unsynced_fds: list[int] = []  # rotated segments still to fsync and close
        self._read_fd: tuple[int, int] | None = None  # (segment start, fd) of the reader
        self._lock_file: int | None = None
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self.recovered: Counter[str] = Counter()  # topic -> records found past the commit
        self.truncated_bytes = 0  # torn or corrupt bytes cut at open

    # -- opening and recovery ---------------------------------------------------------------

    def open(self) -> WriteAheadLog:
        """Lock the directory, cut a torn tail, count what awaits delivery; start syncing."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise PredictionLogError(
                f"prediction log directory {self.directory} (setting prediction_log_dir) "
                f"cannot be used: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(lock, 32).decode(errors="replace").strip() or "unknown"
            os.close(lock)
            raise PredictionLogError(
                f"prediction log directory {self.directory} is in use by another process "
                f"(pid {holder}); give each predictor its own SLUICE_PREDICTION_LOG_DIR"
            ) from None
        os.ftruncate(lock, 0)
        os.pwrite(lock, str(os.getpid()).encode(), 0)
        self._lock_file = lock
        self._recover()
        self._syncer = threading.Thread(target=self._sync_loop, name="sluice-wal-sync", daemon=True)
        self._syncer.start()
        return self

    def _recover(self) -> None:
        starts = sorted(
            int(p.name.removesuffix(_SUFFIX))
            for p in self.directory.glob(f"*{_SUFFIX}")
            if p.name.removesuffix(_SUFFIX).isdigit()
        )
        committed = self._read_commit()
        if not starts:
            starts = [committed or 0]
            self._path(starts[0]).touch()
        # Segments wholly below the commit were delivered: delete them now.
        while len(starts) > 1 and starts[1] <= committed:
            self._path(starts.pop(0)).unlink(missing_ok=True)
        committed = max(committed, starts[0])
        pos = committed
        for i, start in enumerate(starts):
            size = self._path(start).stat().st_size
            if start + size <= pos:
                pos = start + size
                continue
            clean = self._scan(start, max(pos, start), start + size)
            if clean < start + size:  # torn tail or corruption: cut here, drop what follows
                self.truncated_bytes += start + size - clean
                os.truncate(self._path(start), clean - start)
                for later in starts[i + 1 :]:
                    self.truncated_bytes += self._path(later).stat().st_size
                    self._path(later).unlink()
                starts = starts[: i + 1]
                pos = clean
                break
            pos = clean
        if self.truncated_bytes:
            log.error(
                "prediction log: torn or corrupt tail cut",
                extra={"directory": str(self.directory), "bytes": self.truncated_bytes},
            )
        self._segments = starts
        self._end = self._synced = pos
        # A machine crash can lose data the commit already covers: nothing there to send.
        self._committed = self._persisted = min(committed, pos)
        self._fd = os.open(self._path(starts[-1]), os.O_WRONLY | os.O_APPEND)
        if self.recovered:
            log.warning(
                "prediction log: records from before the restart will be sent again",
                extra={"records": dict(self.recovered), "directory": str(self.directory)},
            )

    def _scan(self, start: int, pos: int, stop: int) -> int:
        """Count whole frames of one segment from ``pos``; the offset where valid data ends."""
        with open(self._path(start), "rb") as fh:
            fh.seek(pos - start)
            carry = b""
            base = pos
            while base + len(carry) < stop:
                chunk = fh.read(_READ_CHUNK)
                if not chunk:
                    break
                buffer = carry + chunk
                entries, used, corrupt = decode_frames(buffer, base)
                self.recovered.update(e.topic for e in entries)
                if corrupt:
                    return base + used
                base += used
                carry = buffer[used:]
            return base  # a partial frame left in carry is a torn tail

    def _read_commit(self) -> int:
        try:
            raw = (self.directory / "COMMIT").read_bytes()
            offset, crc = _COMMIT.unpack(raw)
        except (OSError, struct.error):
            return 0
        return offset if zlib.crc32(raw[:8]) == crc else 0

    def _path(self, start: int) -> Path:
        return self.directory / f"{start:020d}{_SUFFIX}"

    # -- appending ----------------------------------------------------------------------------

    @property
    def end(self) -> int:
        return self._end

    @property
    def committed(self) -> int:
        return self._committed

    @property
    def synced(self) -> int:
        return self._synced

    @property
    def pending_bytes(self) -> int:
        """Bytes of records not acknowledged yet."""
        return self._end - self._committed

    @property
    def disk_bytes(self) -> int:
        """Bytes of the segments on disk (acknowledged ones are deleted at the next sync)."""
        return self._end - self._segments[0] if self._segments else 0

    def append(self, topic: str, key: bytes, value: bytes) -> bool:
        """Write one record; False (nothing written) when it does not fit or the disk fails."""
        frame = encode_frame(topic, key, value)
        with self._lock:
            if self._fd < 0 or self.disk_bytes + len(frame) > self.max_bytes:
                return False
            if self._end - self._segments[-1] >= self.segment_bytes:
                self._rotate()
            try:
                written = os.write(self._fd, frame)
                while written < len(frame):  # a short write (disk nearly full): finish it
                    written += os.write(self._fd, frame[written:])
            except OSError as exc:
                # Leave no partial frame behind: later frames must start on a boundary.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._end - self._segments[-1])
                log.error("prediction log: write failed", extra={"error": str(exc)})
                return False
            self._end += len(frame)
            if self.fsync_interval_s == 0:
                os.fsync(self._fd)
                self._synced = self._end
        return True

    def _rotate(self) -> None:
        """Start a new segment at the end (lock held); the syncer fsyncs and closes the old."""
        start = self._end
        fd = os.open(self._path(start), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._unsynced_fds.append(self._fd)
        self._fd = fd
        self._segments.append(start)

    # -- reading (one sender thread) --------------------------------------------------------

    def read(self, offset: int, max_records: int) -> list[Entry]:
        """Up to ``max_records`` whole records from ``offset`` (a frame boundary) on."""
        out: list[Entry] = []
        while len(out) < max_records:
            with self._lock:
                end = self._end
                segments = list(self._segments)
            if offset >= end:
                break
            i = max(j for j, s in enumerate(segments) if s <= offset)
            stop = segments[i + 1] if i + 1 < len(segments) else end
            fd = self._reader_fd(segments[i])
            buffer = os.pread(fd, min(stop - offset, _READ_CHUNK), offset - segments[i])
            if not buffer and i + 1 < len(segments):
                # The end of a segment, or a gap a machine crash left before the next one.
                offset = segments[i + 1]
                continue
            entries, _, corrupt = decode_frames(buffer, offset)
            if not entries and not corrupt and len(buffer) >= _HEADER.size:
                # One frame longer than a chunk: read it whole.
                length = _HEADER.unpack_from(buffer)[0]
                whole = os.pread(fd, _HEADER.size + length, offset - segments[i])
                entries, _, corrupt = decode_frames(whole, offset)
            if not entries:
                raise PredictionLogError(
                    f"prediction log {self.directory} is corrupt at offset {offset} "
                    "(written by another process?)"
                )
            take = entries[: max_records - len(out)]
            out.extend(take)
            offset = take[-1].end
        return out

    def _reader_fd(self, start: int) -> int:
        if self._read_fd is not None and self._read_fd[0] == start:
            return self._read_fd[1]
        if self._read_fd is not None:
            os.close(self._read_fd[1])
        fd = os.open(self._path(start), os.O_RDONLY)
        self._read_fd = (start, fd)
        return fd

    def commit(self, offset: int) -> None:
        """Everything before ``offset`` is acknowledged (persisted at the next sync)."""
        self._committed = offset

    # -- syncing ----------------------------------------------------------------------------

    def _sync_loop(self) -> None:
        interval = self.fsync_interval_s or 0.1
        while not self._stop.wait(interval):
            try:
                self.sync()
            except OSError as exc:  # a full or failing disk: keep serving, say so
                log.error("prediction log: sync failed", extra={"error": str(exc)})

    def sync(self) -> None:
        """fsync appended data, persist the committed offset, delete acknowledged segments."""
        with self._sync_lock:
            self._sync()

    def _sync(self) -> None:
        with self._lock:
            end, fd, rotated = self._end, self._fd, self._unsynced_fds
            self._unsynced_fds = []
        for old in rotated:
            os.fsync(old)
            os.close(old)
        if end > self._synced and fd >= 0:
            os.fsync(fd)  # outside the lock: appends go on while the disk works
            if rotated:
                self._sync_dir()
            self._synced = end
        committed = self._committed
        if committed != self._persisted:
            raw = struct.pack("<Q", committed)
            tmp = self.directory / "COMMIT.tmp"
            tmp.write_bytes(_COMMIT.pack(committed, zlib.crc32(raw)))
            os.replace(tmp, self.directory / "COMMIT")
            self._persisted = committed
            self._delete_below(committed)

    def _sync_dir(self) -> None:
        """New segment files' names reach the disk too (a machine crash keeps them)."""
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _delete_below(self, committed: int) -> None:
        with self._lock:
            doomed = []
            while len(self._segments) > 1 and self._segments[1] <= committed:
                doomed.append(self._segments.pop(0))
        for start in doomed:  # an fd the reader still holds stays valid (POSIX unlink)
            self._path(start).unlink(missing_ok=True)

    def close(self) -> None:
        """Sync everything, persist the commit, release the directory."""
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
        if self._lock_file is None:
            return
        with contextlib.suppress(OSError):
            self.sync()
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = -1
        if self._read_fd is not None:
            os.close(self._read_fd[1])
            self._read_fd = None
        os.close(self._lock_file)  # releases the flock
        self._lock_file = None
