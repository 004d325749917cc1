"""The request log's write-ahead segments: a record is in a file before it waits in memory, so a
process killed (SIGKILL, the OOM killer) loses none of the records it had queued.

`RecordWriter.submit` copies the record's line (the spool's JSON line) into this process's open
segment, a file mapped into memory, then queues the record, both under one lock. The copy is a
`memcpy` into the kernel's page cache: no system call, so the event loop never lets go of the GIL
for it. (An `os.write` there did, and the writer thread, busy with a batch, then kept the GIL for a
switch interval: in bench/log_store.py a call's p99 grew by 8 ms, against 0.05-2 ms with the copy.)
The page cache outlives the process, not a power cut or a kernel crash: there is no fsync, which
would cost each call a disk round trip. Segments are `SEGMENT_BYTES`, reserved on disk when made
(`posix_fallocate`: a full disk is then an error to report, not a SIGBUS on the request path), and
read up to their first NUL byte (a JSON line has none).

The writer thread ends the open segment before a batch that will take everything queued (`rotate`
queues a `SegmentEnd` behind its last record; the next record opens a new segment) and deletes it
once everything queued before that end is in the store or the spool. A segment so lives about one
`flush_interval_ms`; a full one is ended by the record that does not fit.

Segments are `<spool_path>.wal-<pid>.<writer>.<n>`, mode 0600, beside the spool. They hold records
as the call left them, before the content policy: redaction on the request path would cost a call
~30 µs for the ~1 KB of content of bench/log_store.py's records (the built-in patterns alone), the
whole write-ahead ~7.5 µs. The records of a killed process's segments are redacted as another
writer replays them: `claim_orphans` renames the segments of processes that are gone (by pid, as
the spool's worker files) to a name of the claiming writer's own, so two writers starting together
never replay one twice, and one that dies while replaying leaves the file to the next.
"""

from __future__ import annotations

import glob
import logging
import mmap
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("keel.request_log")

T = TypeVar("T")

SEGMENT_BYTES = 1 << 20  # a batch's worth of records at ~1,500 calls/s; a longer line gets a segment of its own
RETRY_S = 1.0  # after a segment could not be made, records wait in memory only this long before the next try
_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC

# The writers of this process, by tag: a segment named with this process's pid and a tag not in here
# was left by an earlier process that had the same pid (a container's pid 1, restarted).
_LIVE: set[str] = set()


class SegmentEnd:
    """A queue marker: segment `path` ends here. The writer calls `set()` once everything queued
    before it is written or spooled, which deletes the segment."""

    __slots__ = ("path",)

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:  # kept: replayed (without duplicates) after this process is gone
            log.warning("request log: the write-ahead file %s cannot be deleted: %s", self.path, exc)


class WriteAhead:
    """The write-ahead segments of one `RecordWriter`; `append` is thread-safe and never raises."""

    def __init__(self, spool_path: str | Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        base = Path(spool_path).expanduser().absolute()
        self.directory = base.parent
        self.prefix = f"{base.name}.wal-"
        self.segment_bytes = segment_bytes
        self.tag = secrets.token_hex(4)
        _LIVE.add(self.tag)
        self.failure: OSError | None = None  # why the last segment could not be made; None while all is well
        self._lock = threading.Lock()
        self._map: mmap.mmap | None = None
        self._path = self.directory
        self._at = 0  # bytes used in the open segment
        self._opened = 0
        self._claimed = 0
        self._retry_at = 0.0

    def append(self, line: bytes, item: T, queue: deque[T]) -> None:
        """Copy `line` into the open segment, then queue `item`. If no segment can be made (a full
        disk), the item is queued all the same: it then waits in memory only, as it would without this."""
        size = len(line)
        with self._lock:
            segment = self._map
            if segment is None or self._at + size > len(segment):
                if segment is not None:
                    segment.close()  # full (rare): ended here, and this record starts the next one
                    self._end(queue)
                segment = self._open(size)
            if segment is not None:
                segment[self._at:self._at + size] = line
                self._at += size
            queue.append(item)

    def rotate(self, queue: deque[Any]) -> None:
        """End the open segment, if any: its `SegmentEnd` is queued behind its last record."""
        with self._lock:
            ended = self._end(queue)
        if ended is not None:
            ended.close()  # unmapped outside the lock: the pages stay in the file (the page cache)

    def _end(self, queue: deque[Any]) -> mmap.mmap | None:
        """Take the open segment out of use, if any; the caller unmaps it."""
        ended, self._map = self._map, None
        if ended is not None:
            queue.append(SegmentEnd(self._path))
        return ended

    def _open(self, size: int) -> mmap.mmap | None:
        now = time.monotonic()
        if now < self._retry_at:
            return None
        self._opened += 1
        path = self.directory / f"{self.prefix}{os.getpid()}.{self.tag}.{self._opened}"
        length = max(self.segment_bytes, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
        try:
            try:
                fd = os.open(path, _FLAGS, 0o600)
            except FileNotFoundError:
                self.directory.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, _FLAGS, 0o600)
            try:
                os.posix_fallocate(fd, 0, length)
                segment = mmap.mmap(fd, length)
            except OSError:
                path.unlink(missing_ok=True)
                raise
            finally:
                os.close(fd)
        except OSError as exc:
            self._retry_at = now + RETRY_S
            if self.failure is None:
                log.error(
                    "request log: the write-ahead file %s cannot be made (%s); records wait in memory only until "
                    "it can, so a crash would lose those not yet in the store. Check the disk of store.spool_path",
                    path, exc,
                )
            self.failure = exc
            return None
        if self.failure is not None:
            self.failure = None
            log.warning("request log: write-ahead files can be made again (%s)", path)
        self._map, self._path, self._at = segment, path, 0
        return segment

    def claim_orphans(self, alive: Callable[[int], bool]) -> list[Path]:
        """The segments left by processes that are gone (`alive(pid)` false), and any this writer
        claimed before, each renamed to a name of this writer's own and cut at its first NUL byte
        (the unused end of the segment)."""
        pid = os.getpid()
        claimed = []
        for path in sorted(self.directory.glob(glob.escape(self.prefix) + "*")):
            owner, _, rest = path.name[len(self.prefix):].partition(".")
            tag, _, part = rest.partition(".")
            if not owner.isdigit():
                continue
            if int(owner) == pid:
                if tag == self.tag and part.startswith("claimed-"):
                    claimed.append(path)  # a replay of ours that did not finish
                if tag in _LIVE:
                    continue
            elif alive(int(owner)):
                continue
            self._claimed += 1
            own = path.with_name(f"{self.prefix}{pid}.{self.tag}.claimed-{self._claimed}")
            try:
                os.replace(path, own)
            except FileNotFoundError:
                continue  # another process claimed it first
            _cut_at_nul(own)
            claimed.append(own)
        return claimed


def _cut_at_nul(path: Path) -> None:
    end = path.read_bytes().find(b"\0")
    if end >= 0:
        os.truncate(path, end)
