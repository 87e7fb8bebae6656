"""The durability boundary: an SQLite (WAL) queue of records between ingest and publisher.

Appends are group-committed by one writer thread (one fsync per batch) and reported back
to the event loop; the publisher reads in order and deletes only what the broker acked.
It never drops a record it accepted: when full, `has_room` says no and ingest answers 5.03.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from gateway.model import Record
from gateway.replay import ReplayWindow, SeqAccept, SeqState

log = logging.getLogger(__name__)

OnDurable = Callable[[bool], None]
# What the pipeline appends: the record, who waits for it, and the seq it accepts. The
# writer replays those accepts on its own window and saves the result in the same
# transaction as the records, so the saved state holds exactly what was committed.
_Append = tuple[Record, OnDurable | None, SeqAccept | None]
# Bytes counted per row beyond topic and payload: rowid, b-tree cell, WAL frame share.
ROW_OVERHEAD_BYTES = 32
# Committed records are also kept in memory for the publisher, up to this much; past it
# (a long broker outage) the publisher reads them back from the file instead.
MEMORY_BYTES = 64 << 20

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS device_seqs (
    device_id TEXT PRIMARY KEY,
    hwm INTEGER NOT NULL,
    bitmap INTEGER NOT NULL,  -- 64 bits, stored signed
    last_ts REAL
) WITHOUT ROWID;
"""
_INSERT_RECORDS = ("INSERT INTO records (topic, payload, retain) VALUES", "", 3)
_UPSERT_SEQS = (
    "INSERT INTO device_seqs (device_id, hwm, bitmap, last_ts) VALUES",
    "ON CONFLICT(device_id) DO UPDATE SET hwm=excluded.hwm, bitmap=excluded.bitmap, "
    "last_ts=excluded.last_ts",
    4,
)
# Rows per multi-row statement, at most (SQLite allows 32,766 parameters per statement).
MAX_ROWS_PER_STATEMENT = 512


@functools.lru_cache(maxsize=64)
def _multirow_sql(head: str, tail: str, width: int, rows: int) -> str:
    values = "(" + ",".join("?" * width) + ")"
    return f"{head} {','.join([values] * rows)} {tail}"


def _execute_rows(db: sqlite3.Connection, statement: tuple[str, str, int],
                  rows: list[tuple[object, ...]]) -> None:
    """Run a multi-row INSERT over `rows` in power-of-two chunks (so few distinct statements
    are prepared). Python's sqlite3 releases and retakes the GIL around every step, and
    `executemany` steps once per row: on a busy event loop each retake waits, and one
    step per chunk cut the gateway's CPU per uplink by ~18% (docs/decisions.md)."""
    head, tail, width = statement
    done, total = 0, len(rows)
    while done < total:
        size = min(MAX_ROWS_PER_STATEMENT, 1 << ((total - done).bit_length() - 1))
        chunk = rows[done:done + size]
        db.execute(_multirow_sql(head, tail, width, size), [v for row in chunk for v in row])
        done += size


def _id_ranges(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted ids as inclusive (first, last) runs: acks come nearly in order, so a batch
    of deletions is usually one range."""
    ranges: list[tuple[int, int]] = []
    for i in sorted(ids):
        if ranges and ranges[-1][1] + 1 == i:
            ranges[-1] = (ranges[-1][0], i)
        else:
            ranges.append((i, i))
    return ranges


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _seq_rows(window: ReplayWindow, devices: Iterable[str]
              ) -> Iterator[tuple[str, int, int, float | None]]:
    for device_id in devices:
        state = window.snapshot(device_id)
        if state is not None:
            hwm, bitmap, last_ts = state
            yield device_id, hwm, _signed64(bitmap), last_ts


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk when COMMIT returns, even if the machine loses power.
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA busy_timeout=5000")
    return db


def record_size(record: Record) -> int:
    return len(record.topic) + len(record.payload) + ROW_OVERHEAD_BYTES


class SpoolError(Exception):
    """The spool file cannot be opened or written."""


class Spool:
    """Durable FIFO of Records. Use as `async with Spool(path, max_bytes) as spool:`."""

    def __init__(self, path: Path, max_bytes: int, max_batch: int = 2000) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Append | list[int] | None]
        self._queue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: threading.Thread | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._bytes = 0  # durable + being written, minus deleted
        self._records = 0
        self._appended = asyncio.Event()
        # Committed, not yet read records: ids [_mem_from_id, _mem_from_id + len) in order.
        self._mem: deque[Record] = deque()
        self._mem_bytes = 0
        self._mem_from_id = 0
        self._uncommitted = 0
        self._drained = asyncio.Event()
        self._deletes_pending = 0  # ids queued for deletion, not yet committed
        self._deleted = asyncio.Event()
        self._deleted.set()
        self.on_commit: Callable[[int, float], None] | None = None  # (records, seconds)
        self.seq_states: dict[str, SeqState] = {}  # as saved, read once at open

    # -- lifecycle ---------------------------------------------------------------
    async def __aenter__(self) -> Spool:
        self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = _connect(self.path)
            db.executescript(SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(records)")}
            if "retain" not in columns:  # a spool written before retained records existed
                db.execute("ALTER TABLE records ADD COLUMN retain INTEGER NOT NULL DEFAULT 0")
            self.seq_states = {
                device_id: (hwm, bitmap & 0xFFFF_FFFF_FFFF_FFFF, last_ts)
                for device_id, hwm, bitmap, last_ts in db.execute("SELECT * FROM device_seqs")
            }
            count, size, last_id = db.execute(
                "SELECT count(*), coalesce(sum(length(topic) + length(payload)), 0), "
                "coalesce(max(id), 0) FROM records"
            ).fetchone()
        except (OSError, sqlite3.Error) as e:
            raise SpoolError(f"cannot open spool {self.path}: {e}") from e
        self._records = count
        self._saved_seqs = ReplayWindow(self.seq_states)  # the writer thread's own copy
        self._mem_from_id = last_id + 1  # older records are read from the file
        self._bytes = size + count * ROW_OVERHEAD_BYTES
        self._reader = _connect(self.path)
        self._writer = threading.Thread(target=self._write_loop, args=(db,), name="spool-writer")
        self._writer.start()
        if count:
            log.info("spool opened with %d records (%d bytes) from an earlier run", count, size)
            self._appended.set()

    async def close(self) -> None:
        """Commit what was appended, then stop the writer thread."""
        if self._writer is None:
            return
        self._queue.put(None)
        await asyncio.to_thread(self._writer.join)
        self._writer = None
        if self._reader is not None:
            # A read cancelled by the shutdown may still run in its thread: wait for it.
            with self._read_lock:
                self._reader.close()
            self._reader = None

    # -- appending (event loop thread) -------------------------------------------
    @property
    def size_bytes(self) -> int:
        return self._bytes

    @property
    def records(self) -> int:
        return self._records

    def has_room(self, nbytes: int) -> bool:
        return self._bytes + nbytes <= self.max_bytes

    def append(self, record: Record, on_durable: OnDurable | None,
               accepted_seq: SeqAccept | None = None) -> None:
        """Queue a record; `on_durable(True)` runs on the loop once it is committed.
        `accepted_seq` updates the device's saved replay window in the same transaction."""
        self._bytes += record_size(record)
        self._uncommitted += 1
        self._drained.clear()
        self._queue.put((record, on_durable, accepted_seq))

    async def wait_committed(self) -> None:
        """Return once everything appended so far is durable (or failed)."""
        if self._uncommitted:
            await self._drained.wait()

    # -- reading and deleting (publisher) ----------------------------------------
    async def wait_for_records(self) -> None:
        await self._appended.wait()

    async def read_after(self, after_id: int, limit: int) -> list[Record]:
        """The oldest records with id > after_id, in order: from memory when it holds them
        (the steady state), else from the file (after a restart, reconnect or overflow)."""
        if after_id + 1 >= self._mem_from_id:
            return self._take_from_memory(after_id, limit)
        rows = await asyncio.to_thread(self._read, after_id, limit)
        if not rows:
            self._appended.clear()
            # A commit may have landed between the read and the clear.
            rows = await asyncio.to_thread(self._read, after_id, limit)
            if rows:
                self._appended.set()
        return [Record(topic, bytes(payload), bool(retain), spool_id)
                for spool_id, topic, payload, retain in rows]

    def _take_from_memory(self, after_id: int, limit: int) -> list[Record]:
        mem = self._mem
        while mem and mem[0].spool_id <= after_id:
            self._forget_from_memory()
        taken: list[Record] = []
        while mem and len(taken) < limit:
            taken.append(self._forget_from_memory())
        if not mem:
            self._appended.clear()
        return taken

    def _forget_from_memory(self) -> Record:
        record = self._mem.popleft()
        self._mem_bytes -= record_size(record)
        self._mem_from_id = record.spool_id + 1
        return record

    def _read(self, after_id: int, limit: int) -> list[tuple[int, str, bytes, int]]:
        assert self._reader is not None
        with self._read_lock:
            return self._reader.execute(
                "SELECT id, topic, payload, retain FROM records WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()

    def delete(self, records: list[Record]) -> None:
        """Forget records the broker acknowledged (committed with the next batch)."""
        if not records:
            return
        self._bytes -= sum(record_size(r) for r in records)
        self._records -= len(records)
        self._deletes_pending += len(records)
        self._deleted.clear()
        self._queue.put([r.spool_id for r in records])

    async def wait_deleted(self) -> None:
        """Return once every deletion so far is committed. A reader starting over (a new
        broker connection) waits for this, or it could re-send an acked record and have it
        deleted, and counted off, twice (a slow fsync makes that window wide)."""
        await self._deleted.wait()

    def _remember(self, batch: list[_Append], first_id: int) -> None:
        """Keep committed records in memory for the publisher, within MEMORY_BYTES."""
        if self._mem_bytes > MEMORY_BYTES or first_id != self._mem_from_id + len(self._mem):
            # Over the budget, or not contiguous: the file serves everything up to here.
            self._mem.clear()
            self._mem_bytes = 0
            self._mem_from_id = first_id + len(batch)
            return
        for offset, (record, _, _) in enumerate(batch):
            self._mem.append(Record(record.topic, record.payload, record.retain, first_id + offset))
            self._mem_bytes += record_size(record)

    # -- the writer thread -------------------------------------------------------
    def _write_loop(self, db: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            batch: list[_Append] = []
            deletions: list[int] = []
            while True:
                if item is None:
                    stopping = True
                elif isinstance(item, list):
                    deletions.extend(item)
                else:
                    batch.append(item)
                if len(batch) >= self.max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch or deletions:
                self._commit(db, batch, deletions)
        db.close()

    def _commit(
        self,
        db: sqlite3.Connection,
        batch: list[_Append],
        deletions: list[int],
    ) -> None:
        started = time.perf_counter()
        ok = True
        last_id = 0
        window = self._saved_seqs
        before: dict[str, SeqState | None] = {}  # to roll the window back with the transaction
        for _, _, accepted in batch:
            if accepted is not None:
                device_id = accepted[0]
                if device_id not in before:
                    before[device_id] = window.snapshot(device_id)
                window.accept(*accepted)
        try:
            db.execute("BEGIN")
            if deletions:
                db.executemany("DELETE FROM records WHERE id BETWEEN ? AND ?",
                               _id_ranges(deletions))
            _execute_rows(db, _INSERT_RECORDS, [(r.topic, r.payload, r.retain) for r, _, _ in batch])
            # One writer and AUTOINCREMENT: the batch got consecutive ids ending here.
            (last_id,) = db.execute("SELECT last_insert_rowid()").fetchone()
            if before:
                _execute_rows(db, _UPSERT_SEQS, list(_seq_rows(window, before)))
            db.execute("COMMIT")
        except sqlite3.Error as e:
            ok = False
            log.error("spool commit of %d records failed: %s; their devices were answered 5.03 "
                      "and will retry", len(batch), e)
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            for device_id, state in before.items():
                window.restore(device_id, state)
        elapsed = time.perf_counter() - started
        assert self._loop is not None
        first_id = last_id - len(batch) + 1 if ok else 0
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._committed, batch, ok, elapsed, first_id,
                                            len(deletions))

    def _committed(
        self, batch: list[_Append], ok: bool, elapsed: float,
        first_id: int, deleted: int,
    ) -> None:
        self._uncommitted -= len(batch)
        self._deletes_pending -= deleted
        if not self._deletes_pending:
            self._deleted.set()
        if ok:
            self._records += len(batch)
            if batch:
                self._remember(batch, first_id)
                self._appended.set()
        else:
            self._bytes -= sum(record_size(r) for r, _, _ in batch)
        if self.on_commit is not None and batch:
            self.on_commit(len(batch), elapsed)
        try:
            for _, on_durable, _ in batch:
                if on_durable is None:
                    continue
                try:
                    on_durable(ok)
                except Exception:  # one broken callback must not strand the rest
                    log.exception("callback of a committed spool record failed")
        finally:
            if not self._uncommitted:
                self._drained.set()
