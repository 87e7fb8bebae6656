"""The gateway's SQLite files: one way to open the small side files (liveness, downlink
commands, LwM2M registrations), one write transaction for them and the spool, and the
kept-open connection (`Writer`) the side files commit through.

The parent directory is made, the journal is WAL, the table exists. Callers use a connection
from worker threads, one at a time, never from the event loop. The spool opens its file itself.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path


def open_db(path: Path, schema_sql: str, *, synchronous_full: bool,
            any_thread: bool = False) -> sqlite3.Connection:
    """A connection to `path` with `schema_sql` (CREATE TABLE IF NOT EXISTS ...) applied.

    `synchronous_full`: set synchronous=FULL (a commit is on disk when it returns, power
    loss included) instead of leaving it to how SQLite was built. `any_thread`: a
    connection kept open and used from one thread at a time, whichever (asyncio.to_thread)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=not any_thread)
    db.execute("PRAGMA journal_mode=WAL")
    if synchronous_full:
        db.execute("PRAGMA synchronous=FULL")
    db.execute(schema_sql)
    return db


@contextlib.contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction on a connection in autocommit mode (isolation_level None): the
    write lock taken at once (a busy file is waited for), committed at the end, rolled
    back on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class Writer:
    """One connection to a side file kept open for its write transactions (one fsync a
    commit), used from worker threads one at a time."""

    def __init__(self, path: Path, schema_sql: str) -> None:
        self._path, self._schema = path, schema_sql
        self._db: sqlite3.Connection | None = None

    def write(self, statements: list[tuple[str, tuple[object, ...]]]) -> None:
        """Run `statements` in order in one transaction: on disk when this returns, or none
        (synchronous=FULL: power loss included)."""
        if self._db is None:
            self._db = open_db(self._path, self._schema, synchronous_full=True, any_thread=True)
            self._db.isolation_level = None  # our own BEGIN and COMMIT
        db = self._db
        with immediate(db):
            for sql, params in statements:
                db.execute(sql, params)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
