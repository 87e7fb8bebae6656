"""SQLite's write lock on one of the gateway's files, held from the test: the gateway's next
commit to that file waits (its busy timeout is 5 s) until the test releases it. That holds a
commit back for as long as a test needs, with nothing of the gateway replaced."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path


class WriteLock:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)

    def acquire(self) -> WriteLock:
        self._db.execute("BEGIN IMMEDIATE")
        return self

    def release(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def close(self) -> None:
        self.release()
        self._db.close()


@contextlib.contextmanager
def write_locks(*paths: Path) -> Iterator[list[WriteLock]]:
    """One WriteLock per file, not yet acquired; all released and closed on exit."""
    locks = [WriteLock(p) for p in paths]
    try:
        yield locks
    finally:
        for lock in locks:
            lock.close()
