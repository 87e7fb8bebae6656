"""The gateway's small SQLite side files (liveness, downlink commands): one way to open them.

The parent directory is made, the journal is WAL, the table exists. Callers use a connection
from one worker thread, never from the event loop. The spool opens its file itself.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_db(path: Path, schema_sql: str, *, synchronous_full: bool) -> sqlite3.Connection:
    """A connection to `path` with `schema_sql` (CREATE TABLE IF NOT EXISTS ...) applied.

    `synchronous_full`: set synchronous=FULL (a commit is on disk when it returns, power
    loss included) instead of leaving it to how SQLite was built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    if synchronous_full:
        db.execute("PRAGMA synchronous=FULL")
    db.execute(schema_sql)
    return db
