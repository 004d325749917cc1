"""Request records and spans, written in batches off the request path; nothing lost on the way.

`submit()` is what the request path calls: it copies the record's line into a write-ahead file
(`store.write_ahead`, keel.observability.write_ahead: a memory-mapped segment, so a killed process
loses nothing it queued) and appends the record to a bounded in-memory queue. One background thread
drains the queue in batches of up to `batch_size` (or whatever is there every
`flush_interval_ms`), applies the content policy (redaction, `log_content`, `max_content_chars`),
writes each batch in one transaction and deletes the write-ahead files it covered.

When the queue is full, or the store cannot be reached, records go to the spool: a JSONL
file (`store.spool_path`), already redacted. Once the store answers again the spool is
replayed into it and removed; writes skip rows already stored, so a replay interrupted
half-way and run again never duplicates.

A record is dropped only when the spool cannot be written either, or when the database, up
and answering, refuses its row (bad data: retried, it would fail for ever and hold up all
the rest; the row is kept in `<spool_path>.rejected` for a person to look at). Never
silently: `dropped` counts it, an ERROR says why, and `on_drop(count, reason)` is called.

The same thread purges records older than `retention_days`, once an hour by default.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import orjson

from keel.config import StoreConfig
from keel.observability.record import RequestRecord, SpanRecord
from keel.observability.redaction import redaction_patterns
from keel.observability.store import RecordRejected, RecordStore, StoreError, StoreUnavailable, request_row, span_row
from keel.observability.write_ahead import SegmentEnd, WriteAhead
from keel.wording import counted

log = logging.getLogger("keel.request_log")

Hook = Callable[[int, str], None]
"""`hook(count, reason)`: how many records were spooled (or dropped), and why."""

Kind = Literal["request", "span"]
Item = tuple[Kind, dict[str, Any]]  # a prepared row, as written to the store or the spool
Marker = threading.Event | SegmentEnd  # in the queue: set once everything queued before it is handled

REDACTED = "[REDACTED]"


REDACT_MARGIN = 1024  # characters past the cut still redacted: longer than any secret a pattern matches


class ContentPolicy:
    """What of a call's input and output is kept: nothing when `log_content` is false, else the
    content with every `redact` match replaced and its text cut to `max_content_chars` in all
    (every string counts, in order; the one that crosses the limit is cut and says by how much).

    It runs in the writer thread, once per record: its cost is throughput, not latency. A
    pattern with a literal prefix (`sk-...`) is cheap; one without (`\\b\\d{3}-...`) is tried at
    every character, ~60 ns each: see bench/log_store.py.
    """

    def __init__(self, config: StoreConfig) -> None:
        self.keep = config.log_content
        self.max_chars = config.max_content_chars
        self.patterns = redaction_patterns(config.redact, defaults=config.redact_defaults)

    def apply(self, value: Any) -> Any:
        if not self.keep or value is None:
            return None
        if not self.patterns and _json_length(value) <= self.max_chars:
            return value  # the common case: nothing to redact, and the strings fit (JSON is longer)
        budget = self.max_chars
        patterns = self.patterns

        def text(content: str) -> str:
            nonlocal budget
            room, length = budget, len(content)
            # Redact before cutting (a cut through a secret would leave a piece the pattern no
            # longer matches), but only what can be kept and a margin longer than any secret: a
            # 16 MB answer must not be scanned whole while this thread holds the GIL.
            if length > room + REDACT_MARGIN:
                content = content[:room + REDACT_MARGIN]
            for pattern in patterns:
                content = pattern.sub(REDACTED, content)
            if length <= room + REDACT_MARGIN and len(content) <= room:
                budget = room - len(content)
                return content
            budget = 0
            cut = (len(content) if length <= room + REDACT_MARGIN else length) - room
            return f"{content[:room]}…[cut {cut} chars]"

        def walk(item: Any) -> Any:
            kind = type(item)
            if kind is str:
                return text(item)
            if kind is dict:
                return {key: walk(inner) for key, inner in item.items()}
            if kind is list or kind is tuple:
                return [walk(inner) for inner in item]
            if isinstance(item, str):
                return text(item)
            if isinstance(item, dict):
                return {key: walk(inner) for key, inner in item.items()}
            if isinstance(item, list | tuple):
                return [walk(inner) for inner in item]
            return item

        return walk(value)


def _json_length(value: Any) -> int:
    """Characters of `value` as JSON, at least the sum of its strings' lengths; unbounded when it
    is not JSON-able (the walk then handles it)."""
    try:
        return len(orjson.dumps(value))
    except TypeError:
        return sys.maxsize


class Spool:
    """A JSONL file where rows wait for the store.

    Safe between threads and between processes sharing the file (several workers on one
    machine): an append holds an exclusive flock and, if the file was renamed under it, follows
    to the new one; a replay first claims the file by renaming it to a name of its own process,
    so no append can land in a file being replayed, and a claimed file is read by one process only.

    `Spool.of_worker(path)`: a worker of `keel serve --workers N` appends to a file of its own
    (`<path>.worker-<pid>`), so workers never wait on one another's lock in an outage. Each replays
    its own, the shared one (left by a one-process run) and those of workers that are gone
    (killed, say: what they spooled is replayed by the next worker that reaches the store).
    """

    def __init__(self, path: str | Path, *, worker: int | None = None) -> None:
        self.shared = Path(path).expanduser().absolute()
        self.worker = worker
        self.path = self.shared if worker is None else self._worker_name(worker)
        self._lock = threading.Lock()

    @classmethod
    def of_worker(cls, path: str | Path) -> Spool:
        """The spool of this worker process."""
        return cls(path, worker=os.getpid())

    def append(self, lines: Sequence[bytes]) -> None:
        """Add lines (each ending in a newline), all or none: raises OSError when the file cannot be
        written, and then none of them is added."""
        data = b"".join(lines)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    if not _same_file(fd, self.path):
                        continue  # claimed for a replay while we waited: append to a new file
                    end = os.fstat(fd).st_size  # under the flock: no one else appends now
                    view = memoryview(data)
                    try:
                        while view:
                            view = view[os.write(fd, view) :]
                    except OSError:
                        # Out of room part-way (a full disk): a cut line would swallow the next one
                        # appended after it, so the file goes back to whole lines.
                        with contextlib.suppress(OSError):
                            os.ftruncate(fd, end)
                        raise
                    return
                finally:
                    os.close(fd)  # also releases the flock

    def claim(self) -> Path | None:
        """The next file to replay, renamed to this process's own name; None when none waits."""
        own = self._claimed_name(self.worker if self.worker is not None else os.getpid())
        if own.exists():
            return own
        for path in (self.path, self.shared) if self.worker is not None else (self.path,):
            if self._claim_appended(path, own):
                return own
        orphans = [*self.shared.parent.glob(f"{self.shared.name}.replaying-*")]
        if self.worker is not None:
            orphans += self.shared.parent.glob(f"{self.shared.name}.worker-*")
        for orphan in orphans:
            pid = orphan.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not process_alive(int(pid)):
                try:
                    os.replace(orphan, own)  # left by a process that died (mid-replay)
                except FileNotFoundError:
                    continue  # another process claimed it first
                return own
        return None

    def _claim_appended(self, path: Path, own: Path) -> bool:
        """Rename a file others may append to, once no append is under way."""
        with self._lock:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if _same_file(fd, path):
                    os.replace(path, own)
                    return True
            finally:
                os.close(fd)
        return False

    def _claimed_name(self, pid: int) -> Path:
        return self.shared.with_name(f"{self.shared.name}.replaying-{pid}")

    def _worker_name(self, pid: int) -> Path:
        return self.shared.with_name(f"{self.shared.name}.worker-{pid}")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def process_alive(pid: int) -> bool:
    """Whether a process of this id runs (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def spool_line(kind: Kind, row: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps({"kind": kind, "row": row}, default=str, option=orjson.OPT_NON_STR_KEYS) + b"\n"
    except TypeError:  # an int beyond 64 bits, say
        return json.dumps({"kind": kind, "row": row}, default=str).encode() + b"\n"


def write_ahead_line(entry: RequestRecord | SpanRecord) -> bytes:
    """The spool's line of a record as submitted (before the content policy); b"" when it has none.
    orjson reads the dataclass itself: no row dict is built on the request path."""
    kind: Kind = "span" if isinstance(entry, SpanRecord) else "request"
    try:
        return orjson.dumps({"kind": kind, "row": entry}, default=str, option=orjson.OPT_NON_STR_KEYS) + b"\n"
    except TypeError:
        pass
    try:
        return spool_line(kind, span_row(entry) if isinstance(entry, SpanRecord) else request_row(entry))
    except Exception:  # the writer thread will say what is wrong with it
        return b""


class RecordWriter:
    """Batches records and spans into a `RecordStore` from one background thread.

    Counters (records and spans alike): `written` (straight from the queue), `spooled`,
    `replayed` (from the spool into the store), `dropped`; `queue_depth` is read live.
    `on_drop(count, reason)` and `on_spool(count, reason)` are called from whichever thread
    saw it (the writer's, or the caller's when the queue is full): keep them quick and
    thread-safe, like a Prometheus counter's `inc`.

    `start()` the thread, `close()` to flush; `close` blocks, so from async code call it
    through `asyncio.to_thread`. A closed writer can be started again.
    """

    def __init__(
        self,
        store: RecordStore,
        config: StoreConfig,
        *,
        on_drop: Hook | None = None,
        on_spool: Hook | None = None,
        migrate: bool = True,
        retention_interval_s: float = 3600.0,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        orphan_scan_s: float = 30.0,
    ) -> None:
        self.store = store
        self.config = config
        self.policy = ContentPolicy(config)
        self.spool = Spool(config.spool_path)
        # Rows the database refused: kept for a person to look at, never replayed by themselves.
        self.rejects = Spool(self.spool.path.with_name(self.spool.path.name + ".rejected"))
        self.on_drop = on_drop
        self.on_spool = on_spool
        self.write_ahead = WriteAhead(config.spool_path) if config.write_ahead else None
        self.written = 0
        self.spooled = 0
        self.replayed = 0
        self.dropped = 0
        self._queue: deque[RequestRecord | SpanRecord | Marker] = deque()
        self._max = config.queue_size
        self._batch = config.batch_size
        self._interval = config.flush_interval_ms / 1000
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._counts = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._migrate = migrate
        self._retention_interval = retention_interval_s
        self._retry_initial = retry_initial_s
        self._retry_max = retry_max_s
        self._backoff = retry_initial_s
        self._store_up = False
        self._outage_logged = False
        self._retry_at = 0.0
        self._next_purge = 0.0
        self._spool_pending = True  # a previous run may have left one
        # And write-ahead files, if it was killed: looked for at once, then every orphan_scan_s (a process
        # beside this one, a worker or a replica on the same spool directory, may be killed while it runs).
        self._orphan_scan = orphan_scan_s
        self._next_orphan_scan = 0.0
        self._replay_at: tuple[Path, int] | None = None  # how far a failed replay got

    # ------------------------------------------------------------------ the request path

    def submit(self, record: RequestRecord) -> None:
        """Queue a record for writing; never blocks on I/O. Do not change it afterwards."""
        self._put(record)

    def submit_span(self, span: SpanRecord) -> None:
        """Queue a finished span, like `submit`."""
        self._put(span)

    def _put(self, item: RequestRecord | SpanRecord) -> None:
        queue = self._queue
        if len(queue) >= self._max or self._closed:
            self._overflow(item)
            return
        if self.write_ahead is None:
            queue.append(item)
        else:
            self.write_ahead.append(write_ahead_line(item), item, queue)
        if len(queue) >= self._batch and not self._wake.is_set():
            self._wake.set()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)  # counts a pending flush() marker too: close enough for a gauge

    @property
    def store_available(self) -> bool:
        """Whether the last contact with the store succeeded (records are spooled while not)."""
        return self._store_up

    def stats(self) -> dict[str, int | bool]:
        return {
            "written": self.written, "spooled": self.spooled, "replayed": self.replayed,
            "dropped": self.dropped, "queue_depth": self.queue_depth, "store_available": self._store_up,
        }

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the writer thread (again, after a `close`: what was spooled meanwhile is replayed)."""
        if self._closed:
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError("the writer thread is still finishing a write from before close(); start later")
            self._closed = False
            self._thread = None
            self._stopping.clear()
            self._spool_pending = True
            self._next_orphan_scan = 0.0
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="keel-request-log", daemon=True)
        self._thread.start()
        # A process that exits without close() still flushes what it queued.
        atexit.register(self._at_exit)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is written (or spooled), and its write-ahead
        files deleted; False on timeout or when the writer is not running."""
        if self._thread is None or self._closed:
            return False
        self._rotate()
        done = threading.Event()
        self._queue.append(done)
        self._wake.set()
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write everything queued, replay the spool if the store is up, stop the thread, and
        release the store's connections (it reconnects if used again).

        If the thread does not finish in `timeout` seconds, what is still queued is spooled.
        """
        if self._closed:
            return
        self._closed = True  # from now on submit() spools directly
        atexit.unregister(self._at_exit)
        if self._thread is None:
            self._finish()  # never started: flush from here
        else:
            self._stopping.set()
            self._wake.set()
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error(
                    "the request log writer did not finish within %.1fs; spooling what is still queued to %s",
                    timeout, self.spool.path,
                )
        # Whatever a late submit() or a stuck thread left behind goes to the spool.
        self._rotate()
        items, markers = self._prepare_all(self._take(len(self._queue)))
        if items:
            self._to_spool(items, "closing")
        for marker in markers:
            marker.set()
        if self._thread is None or not self._thread.is_alive():
            self.store.close()

    def _at_exit(self) -> None:
        self.close(timeout=10.0)

    # ------------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._cycle()
            except Exception:
                log.exception("request log writer: unexpected error; carrying on")
            if len(self._queue) < self._batch and not self._stopping.is_set():
                self._wake.wait(self._wait_time())
                self._wake.clear()
        try:
            self._finish()
        except Exception:
            log.exception("request log writer: unexpected error while closing")

    def _cycle(self) -> None:
        now = time.monotonic()
        if not self._store_up and now >= self._retry_at:
            self._recover()
        if len(self._queue) <= self._batch:
            self._rotate()  # the batch taken next covers the segment written so far
        self._drain(self._batch)
        if self.write_ahead is not None and now >= self._next_orphan_scan:
            self._adopt_orphans(self.write_ahead)
        if self._store_up and self._spool_pending:
            self._replay()
        if self._store_up and now >= self._next_purge:
            self._purge()

    def _finish(self) -> None:
        if not self._store_up:
            self._recover()  # one last try, so a spool can be replayed
        self._rotate()
        while self._queue:
            self._drain(self._batch)
        if self._store_up and self._spool_pending:
            self._replay()

    def _wait_time(self) -> float:
        now = time.monotonic()
        wait = self._interval
        if not self._store_up:
            wait = min(wait, self._retry_at - now)
        if self._store_up:
            wait = min(wait, self._next_purge - now)
        if self.write_ahead is not None:
            wait = min(wait, self._next_orphan_scan - now)
        return max(wait, 0.001)

    def _rotate(self) -> None:
        if self.write_ahead is not None:
            self.write_ahead.rotate(self._queue)

    def _take(self, limit: int) -> list[RequestRecord | SpanRecord | Marker]:
        taken: list[RequestRecord | SpanRecord | Marker] = []
        pop = self._queue.popleft
        try:
            for _ in range(limit):
                taken.append(pop())
        except IndexError:
            pass
        return taken

    def _drain(self, limit: int) -> None:
        items, markers = self._prepare_all(self._take(limit))
        try:
            if items:
                self.written += self._deliver(items)
        except Exception:
            log.exception("request log writer: unexpected error writing a batch; spooling it")
            self._to_spool(items, "writer_error")
        finally:
            for marker in markers:
                marker.set()

    def _prepare_all(
        self, taken: list[RequestRecord | SpanRecord | Marker]
    ) -> tuple[list[Item], list[Marker]]:
        items: list[Item] = []
        markers: list[Marker] = []
        for entry in taken:
            if isinstance(entry, threading.Event | SegmentEnd):
                markers.append(entry)
                continue
            try:
                items.append(self._prepared(entry))
            except Exception as exc:  # content that cannot be redacted is not written anywhere
                self._drop(1, "unpreparable", f"{type(entry).__name__} {getattr(entry, 'request_id', '')}: {exc!r}")
        return items, markers

    def _prepared(self, entry: RequestRecord | SpanRecord) -> Item:
        if isinstance(entry, SpanRecord):
            return "span", span_row(entry)
        return self._policed(("request", request_row(entry)))

    def _policed(self, item: Item) -> Item:
        """A row with the content policy applied (a request's input and output)."""
        kind, row = item
        if kind == "request":
            row["input"] = self.policy.apply(row.get("input"))
            row["output"] = self.policy.apply(row.get("output"))
        return item

    def _deliver(self, items: list[Item]) -> int:
        """Items into the store, or the spool while it is down; returns the rows written."""
        written = 0
        if self._store_up:
            written, done = self._store_items(items)
            items = items[done:]
        if items:
            self._to_spool(items, "store_unavailable")
        return written

    def _store_items(self, items: list[Item]) -> tuple[int, int]:
        """Write items; returns (rows written, items handled). Handled items are written or,
        when the database refuses them, dropped; the rest wait for the store to come back."""
        try:
            self._write(items)
            return len(items), len(items)
        except StoreUnavailable as exc:
            if not self._rows_at_fault(exc):
                return 0, 0
        except RecordRejected:
            pass
        # One at a time, to keep every row the database accepts.
        written = 0
        for i, item in enumerate(items):
            try:
                self._write([item])
                written += 1
            except StoreUnavailable as exc:
                if not self._rows_at_fault(exc):
                    return written, i
                self._reject(item, exc)
            except RecordRejected as exc:
                self._reject(item, exc)
        return written, len(items)

    def _reject(self, item: Item, exc: StoreError) -> None:
        try:
            self.rejects.append([spool_line(*item)])
            kept = f"the row is kept in {self.rejects.path}"
        except OSError as error:
            kept = f"and {self.rejects.path} cannot be written ({error})"
        self._drop(1, "rejected", f"{_name(item)}: {exc}; {kept}")

    def _rows_at_fault(self, exc: StoreUnavailable) -> bool:
        """A write failed in a way that reads as an outage: it is one only if the store is not
        reachable now. If it is (and has its tables), the rows were the problem; retrying them
        from the spool for ever would stall every record behind them."""
        try:
            schema = self.store.has_schema()
        except StoreError:
            schema = False
        else:
            if not schema:
                self._migrate = True  # someone dropped the tables: make them again
        if not schema:
            self._went_down(exc)
        return schema

    def _write(self, items: Sequence[Item]) -> None:
        self.store.write(
            [row for kind, row in items if kind == "request"], [row for kind, row in items if kind == "span"]
        )

    # ------------------------------------------------------------------ outages and the spool

    def _overflow(self, entry: RequestRecord | SpanRecord) -> None:
        """On the caller's thread: the queue is full (or the writer closed), so spool it now."""
        items, _ = self._prepare_all([entry])  # never raises: this is the request path
        if items:
            self._to_spool(items, "closed" if self._closed else "queue_full")

    def _to_spool(self, items: Sequence[Item], reason: str) -> None:
        try:
            self.spool.append([spool_line(kind, row) for kind, row in items])
        except OSError as exc:
            self._drop(len(items), reason, f"the spool file {self.spool.path} cannot be written ({exc})")
            return
        with self._counts:
            self.spooled += len(items)
        self._spool_pending = True
        _call(self.on_spool, len(items), reason)

    def _drop(self, count: int, reason: str, why: str) -> None:
        with self._counts:
            self.dropped += count
            total = self.dropped
        log.error("request log: %d record(s) dropped (%s): %s; %d dropped in all", count, reason, why, total)
        _call(self.on_drop, count, reason)

    def _recover(self) -> None:
        """Try the store again: bring the schema up to date, then replay the spool."""
        try:
            if self._migrate:
                self.store.migrate()
                self._migrate = False
            else:
                self.store.has_schema()  # a probe
        except StoreError as exc:
            self._went_down(exc)
            return
        except Exception as exc:  # an Alembic error: a database newer than this Keel, say
            log.exception("request log: the schema of %s cannot be upgraded", self.store.safe_url)
            self._went_down(exc)
            return
        was_down = self._outage_logged
        self._store_up = True
        self._backoff = self._retry_initial
        self._outage_logged = False
        if was_down:
            log.warning("request log store %s is reachable again", self.store.safe_url)

    def _went_down(self, exc: BaseException) -> None:
        self._store_up = False
        self._retry_at = time.monotonic() + self._backoff
        if not self._outage_logged:
            log.error(
                "request log store unavailable, spooling records to %s until it is back: %s", self.spool.path, exc
            )
            self._outage_logged = True
        else:
            log.warning("request log store still unavailable, next try in %.1fs: %s", self._backoff, exc)
        self._backoff = min(self._backoff * 2, self._retry_max)

    def _adopt_orphans(self, write_ahead: WriteAhead) -> None:
        """The write-ahead files of processes that are gone: their records, redacted now, into the
        store (or the spool while it is down), then the files deleted."""
        self._next_orphan_scan = time.monotonic() + self._orphan_scan
        try:
            orphans = write_ahead.claim_orphans(process_alive)
        except OSError as exc:
            log.error("request log: the write-ahead files beside %s cannot be read: %s", self.spool.path, exc)
            return
        for path in orphans:
            try:
                self._adopt(path)
            except OSError as exc:  # kept: the next scan (or writer) tries again, without duplicates
                log.error("request log: the write-ahead file %s cannot be replayed: %s", path, exc)

    def _adopt(self, path: Path) -> None:
        chunk: list[Item] = []
        for line_no, item in self._read(path, 0):
            if item is None:
                continue
            try:
                chunk.append(self._policed(item))
            except Exception as exc:  # content that cannot be redacted is not written anywhere
                self._drop(1, "unpreparable", f"line {line_no + 1} of {path}: {exc!r}")
            if len(chunk) >= self._batch:
                self.replayed += self._deliver(chunk)
                chunk = []
        if chunk:
            self.replayed += self._deliver(chunk)
        path.unlink(missing_ok=True)
        log.warning("request log: the records a killed process had queued were recovered from %s", path)

    def _replay(self) -> None:
        """Move spooled rows into the store, one claimed file at a time."""
        self._spool_pending = False  # an append from now on sets it again
        while True:
            path = self.spool.claim()
            if path is None:
                return
            start = self._replay_at[1] if self._replay_at and self._replay_at[0] == path else 0
            if not self._replay_file(path, start):
                self._spool_pending = True
                return
            path.unlink(missing_ok=True)
            self._replay_at = None
            log.info("request log: the spool %s was replayed into the store", path)

    def _replay_file(self, path: Path, start: int) -> bool:
        """Lines from `start` on into the store; False when the store failed on the way."""
        chunk: list[tuple[int, Item]] = []
        for line_no, item in self._read(path, start):
            if item is not None:
                chunk.append((line_no, item))
            if len(chunk) >= self._batch:
                if not self._replay_chunk(path, chunk):
                    return False
                chunk = []
        return self._replay_chunk(path, chunk) if chunk else True

    def _replay_chunk(self, path: Path, chunk: list[tuple[int, Item]]) -> bool:
        written, done = self._store_items([item for _, item in chunk])
        self.replayed += written
        if done < len(chunk):
            self._replay_at = (path, chunk[done][0])  # resume at the first line not handled
            return False
        self._replay_at = (path, chunk[-1][0] + 1)
        return True

    def _read(self, path: Path, start: int) -> Iterator[tuple[int, Item | None]]:
        with path.open("rb") as lines:
            for line_no, line in enumerate(lines):
                if line_no < start or not line.strip():
                    continue
                try:
                    entry = orjson.loads(line)
                    kind, row = entry["kind"], entry["row"]
                    if kind not in ("request", "span") or not isinstance(row, dict):
                        raise ValueError(f"unknown entry kind {kind!r}")
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    self._drop(1, "spool_corrupt", f"line {line_no + 1} of {path} cannot be read ({exc})")
                    yield line_no, None
                    continue
                yield line_no, (kind, row)

    def _purge(self) -> None:
        self._next_purge = time.monotonic() + self._retention_interval
        cutoff = time.time() - self.config.retention_days * 86_400
        try:
            purged = self.store.purge(cutoff)
        except StoreError as exc:
            log.warning("request log: the retention purge failed, next try in %.0fs: %s", self._retention_interval, exc)
            return
        if purged:
            log.info("request log: purged %s older than %g days", counted(purged, "record"), self.config.retention_days)


def _name(item: Item) -> str:
    kind, row = item
    return f"{kind} {row.get('request_id') if kind == 'request' else row.get('span_id')}"


def _call(hook: Hook | None, count: int, reason: str) -> None:
    if hook is None:
        return
    try:
        hook(count, reason)
    except Exception:
        log.exception("request log: the %s hook failed", getattr(hook, "__name__", "callback"))
