"""The SQLite migration lock: processes creating one new request log together take turns, and
no lock file is left beside the database."""

from __future__ import annotations

import fcntl
import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from keel.observability.store import RecordStore, _exclusive_file


def migrate(url: str, start: Any) -> None:
    start.wait()
    store = RecordStore(url)
    try:
        store.migrate()
    finally:
        store.close()


def test_processes_migrating_one_new_database_together_all_succeed_and_leave_no_lock(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/log/keel.db"
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [context.Process(target=migrate, args=(url, start)) for _ in range(3)]
    for worker in workers:
        worker.start()
    start.set()  # all at once
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    store = RecordStore(url)
    try:
        assert store.has_schema()
    finally:
        store.close()
    assert sorted(p.name for p in (tmp_path / "log").iterdir() if "lock" in p.name) == []


def test_the_lock_is_exclusive_and_deleted_by_its_holder(tmp_path: Path) -> None:
    lock = tmp_path / "db.migrate-lock"
    with _exclusive_file(lock):
        with open(lock, "a") as other, pytest.raises(BlockingIOError):  # another open file: refused
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not lock.exists()
