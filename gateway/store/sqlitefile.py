"""The gateway's SQLite files: one way to open the small side files (liveness, downlink
commands), and one write transaction for them and the spool.

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
