"""The durability boundary: an SQLite (WAL) queue of records between ingest and publisher.

Appends are group-committed by one writer thread (one fsync per batch, a batch held open
at most `linger_s` so a moderate load still commits in groups) and reported back to the
event loop; the publisher reads in order and deletes only what the broker acked. It never
drops a record it accepted: when full, `has_room` says no and ingest answers 5.03. One
batch that fails (disk full, I/O error, a bug) fails only its own records, never the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gateway.model import Record
from gateway.pipeline.replay import ReplayWindow, Seen, SeqAccept, SeqState
from gateway.store.sqlitefile import immediate

log = logging.getLogger(__name__)

OnDurable = Callable[[bool], None]
# What the pipeline appends: the record, who waits for it, and the seq it accepts. The
# writer replays those accepts on its own window and saves the result in the same
# transaction as the records, so the saved state holds exactly what was committed.
# The last field is when the record's wait began (time.monotonic(): its uplink's receipt,
# else its append), for the linger bound.
_Append = tuple[Record, OnDurable | None, SeqAccept | None, float]


class _Together:
    """Appends made in one `Spool.together()` scope (a batch of datagrams read at once),
    handed to the writer in one piece, so they share one commit that lingers from the
    oldest of them."""

    __slots__ = ("appends",)

    def __init__(self, appends: list[_Append]) -> None:
        self.appends = appends


def _due(appends: list[_Append], linger_s: float, deadline: float | None) -> float:
    """When the oldest of `appends` has lingered enough (or `deadline`, if sooner)."""
    due = min(waiting_since for _, _, _, waiting_since in appends) + linger_s
    return due if deadline is None else min(due, deadline)


class _DueDeletions:
    """Deletions the loop held for DELETE_LINGER_S with no append to ride with: the writer
    commits them at once."""

    __slots__ = ("ids",)

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

# A failed batch hands the loop the replay state its devices had before it (what the
# file still holds) and the accepts it carried, so the pipeline can roll back exactly.
OnRollback = Callable[[dict[str, SeqState | None], set[tuple[str, int]]], None]
# Bytes counted per row beyond topic and payload: rowid, b-tree cell, WAL frame share.
ROW_OVERHEAD_BYTES = 32
# Committed records are also kept in memory for the publisher, up to this much; past it
# (a long broker outage) the publisher reads them back from the file instead.
MEMORY_BYTES = 64 << 20

# The on-disk layout's version (PRAGMA user_version). 2: records ids assigned by the writer
# (no AUTOINCREMENT, no sqlite_sequence page per commit) and the seq_log table. A file of a
# newer version is refused, never misread.
FORMAT_VERSION = 2
# Why this layout (docs/decisions.md, "The commit path at the plant's load"): a commit
# writes whole pages, so each one must touch few. Records and seq_log are appended at
# their b-trees' right edge (one or two leaf pages per commit, whatever the devices);
# the per-device replay state, whose rows are scattered over ~600 pages with 40,000
# devices, is folded from seq_log into device_seqs only every SEQ_FOLD_ROWS accepts.
SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
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
CREATE TABLE IF NOT EXISTS seq_log (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL,
    reset INTEGER NOT NULL  -- 1: the accept restarted the device's counter (Seen.RESET)
);
"""
# A commit rewrites every page it touches, and at 667 uplinks/s with a 20 ms linger one
# holds ~14 records (~4.7 KB): with 4 KiB pages that is ~7 WAL frames (two records
# leaves, their parent, page 1 and the freelist trunk as pages are freed and reused,
# seq_log), with 1 KiB pages about as many frames of a quarter the size. Measured:
# 2,439 -> 1,144 bytes written per record (512: 1,186; docs/decisions.md).
PAGE_SIZE_BYTES = 1024
# An older file with other pages is rebuilt with these at open (VACUUM) if it holds at
# most this many records: seconds at most; a larger backlog keeps its pages until a
# start that finds it drained.
REPAGE_MAX_RECORDS = 100_000
# Accepts logged before they are folded into device_seqs (and the log emptied): at 667
# uplinks/s about every 10 minutes.
SEQ_FOLD_ROWS = 400_000
# A batch of deletions alone waits this long for appends to ride with (an acked record
# left in the file is only re-sent after a crash, and consumers drop duplicates by seq).
DELETE_LINGER_S = 1.0
# After a failed commit, its deletions are tried again this often even with no appends.
RETRY_S = 1.0
_INSERT_RECORDS = ("INSERT INTO records (id, topic, payload, retain) VALUES", "", 4)
_INSERT_SEQ_LOG = ("INSERT INTO seq_log (device_id, seq, ts, reset) VALUES", "", 4)
_UPSERT_SEQS = (
    "INSERT INTO device_seqs (device_id, hwm, bitmap, last_ts) VALUES",
    "ON CONFLICT(device_id) DO UPDATE SET hwm=excluded.hwm, bitmap=excluded.bitmap, "
    "last_ts=excluded.last_ts",
    4,
)
# Rows per multi-row statement, at most (SQLite allows 32,766 parameters per statement).
MAX_ROWS_PER_STATEMENT = 512
# Up to this many rows go in one statement of their exact size: a commit of ~21 records at
# 667/s was 3 + 3 statements of power-of-two chunks (16 + 4 + 1), each with its own step
# and GIL hand-over. Sizes 1-64 of three statements: within the connection's cache.
EXACT_ROWS_MAX = 64
CACHED_STATEMENTS = 256


@functools.lru_cache(maxsize=CACHED_STATEMENTS)
def _multirow_sql(head: str, tail: str, width: int, rows: int) -> str:
    values = "(" + ",".join("?" * width) + ")"
    return f"{head} {','.join([values] * rows)} {tail}"


def _execute_rows(db: sqlite3.Connection, statement: tuple[str, str, int],
                  rows: Sequence[tuple[object, ...]]) -> None:
    """Run a multi-row INSERT over `rows`: in one statement up to EXACT_ROWS_MAX rows, else
    in power-of-two chunks (so few distinct statements are prepared). Python's sqlite3
    releases and retakes the GIL around every step, and `executemany` steps once per row:
    on a busy event loop each retake waits, and one step per chunk cut the gateway's CPU
    per uplink by ~18% (docs/decisions.md)."""
    head, tail, width = statement
    done, total = 0, len(rows)
    while done < total:
        left = total - done
        size = left if left <= EXACT_ROWS_MAX else min(MAX_ROWS_PER_STATEMENT,
                                                       1 << (left.bit_length() - 1))
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


def _log_row(accepted: SeqAccept) -> tuple[str, int, float | None, int]:
    device_id, seq, ts, seen = accepted
    return device_id, seq, ts, int(seen is Seen.RESET)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                         cached_statements=CACHED_STATEMENTS)
    db.execute(f"PRAGMA page_size={PAGE_SIZE_BYTES}")  # a new file only; see _repage
    db.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk when COMMIT returns, even if the machine loses power.
    # tests/test_commit_order.py checks it on the running gateway (every 2.04 after the
    # fdatasync of its commit) and on the connection itself.
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA busy_timeout=5000")
    return db


def _upgrade(db: sqlite3.Connection) -> None:
    """Bring a spool file to FORMAT_VERSION in one transaction; refuse a newer one."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > FORMAT_VERSION:
        raise SpoolError(f"spool format {version} was written by a newer nbiot-gateway; this "
                         f"one reads up to format {FORMAT_VERSION}: upgrade it, or move the "
                         "file away (its records would be lost)")
    if version == FORMAT_VERSION:
        return
    with immediate(db):
        columns = {row[1] for row in db.execute("PRAGMA table_info(records)")}
        (table_sql,) = db.execute(
            "SELECT coalesce(max(sql), '') FROM sqlite_master WHERE name = 'records'").fetchone()
        if "AUTOINCREMENT" in table_sql.upper():  # format 0/1: rebuild without it
            retain = "retain" if "retain" in columns else "0"
            db.execute("ALTER TABLE records RENAME TO records_v1")
            _create_tables(db)
            db.execute(f"INSERT INTO records (id, topic, payload, retain) "
                       f"SELECT id, topic, payload, {retain} FROM records_v1")
            db.execute("DROP TABLE records_v1")
        else:
            _create_tables(db)
        db.execute(f"PRAGMA user_version={FORMAT_VERSION}")


def _repage(db: sqlite3.Connection, path: Path) -> None:
    """Rebuild a spool written with other pages (an older release's 4 KiB) with
    PAGE_SIZE_BYTES, if its backlog is small. VACUUM is atomic: a kill -9 during it
    leaves the old file as it was. The WAL must be off while the page size changes."""
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    if page_size == PAGE_SIZE_BYTES:
        return
    (records,) = db.execute("SELECT count(*) FROM records").fetchone()
    if records > REPAGE_MAX_RECORDS:
        log.info("spool %s keeps its %d-byte pages while it holds %d records; a start that "
                 "finds it drained rebuilds it with %d-byte pages (fewer bytes written per "
                 "uplink)", path, page_size, records, PAGE_SIZE_BYTES)
        return
    started = time.perf_counter()
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute(f"PRAGMA page_size={PAGE_SIZE_BYTES}")
    db.execute("VACUUM")
    db.execute("PRAGMA journal_mode=WAL")
    log.info("spool %s rebuilt with %d-byte pages (was %d) in %.2f s", path, PAGE_SIZE_BYTES,
             page_size, time.perf_counter() - started)


def _create_tables(db: sqlite3.Connection) -> None:
    """SCHEMA statement by statement (executescript would commit the open transaction)."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)


def fold_seq_log(db: sqlite3.Connection) -> dict[str, SeqState]:
    """Replay seq_log onto device_seqs in one transaction and empty it; return the states.
    The spool does it at open; rebalance before it copies device_seqs between files."""
    if not _has_table(db, "device_seqs"):  # a file from before replay windows
        return {}
    saved = {device_id: (hwm, bitmap & 0xFFFF_FFFF_FFFF_FFFF, last_ts)
             for device_id, hwm, bitmap, last_ts in db.execute("SELECT * FROM device_seqs")}
    if not _has_table(db, "seq_log"):
        return saved
    window = ReplayWindow(saved)
    touched: set[str] = set()
    for device_id, seq, ts, reset in db.execute(
            "SELECT device_id, seq, ts, reset FROM seq_log ORDER BY id"):
        window.accept(device_id, seq, ts, Seen.RESET if reset else Seen.NEW)
        touched.add(device_id)
    if not touched:  # a clean stop folded everything already
        return saved
    with immediate(db):
        _fold_into(db, window, touched)
    return {device_id: state for device_id in window.devices()
            if (state := window.snapshot(device_id)) is not None}


def _fold_into(db: sqlite3.Connection, window: ReplayWindow, devices: Iterable[str]) -> None:
    """Within a transaction: device_seqs takes the window's state of `devices`, and
    seq_log, whose accepts that state holds, is emptied. The rows are made a statement's
    worth at a time: 40,000 devices' rows at once were ~6 MB of short-lived tuples every
    ten minutes, which the allocator had to find all at once (docs/decisions.md, "The
    soak's RSS steps")."""
    rows = _seq_rows(window, devices)
    while chunk := list(itertools.islice(rows, MAX_ROWS_PER_STATEMENT)):
        _execute_rows(db, _UPSERT_SEQS, chunk)
    db.execute("DELETE FROM seq_log")


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                      (name,)).fetchone() is not None


def record_size(record: Record) -> int:
    return len(record.topic) + len(record.payload) + ROW_OVERHEAD_BYTES


class SpoolError(Exception):
    """The spool file cannot be opened or written."""


class Spool:
    """Durable FIFO of Records. Use as `async with Spool(path, max_bytes) as spool:`.
    `linger_s`: how long an appended record may wait for others to share its commit."""

    def __init__(self, path: Path, max_bytes: int, max_batch: int = 2000,
                 linger_s: float = 0.0) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_batch = max_batch
        self.linger_s = linger_s
        self._queue: queue.SimpleQueue[_Append | _Together | _DueDeletions | list[int] | None]
        self._queue = queue.SimpleQueue()
        self._together: list[_Append] | None = None  # appends held by together()
        self._carried: _Together | None = None  # the writer's: a group for the next batch
        # While the writer lingers: until when (it writes, the loop reads), and the event
        # that a piece due sooner sets to end its wait early.
        self._linger_until: float | None = None
        self._sooner = threading.Event()
        # Deletions wait on the loop for an append to ride with (or DELETE_LINGER_S): each
        # handed over alone woke the writer thread once more per commit.
        self._deletions_held: list[int] = []
        self._deletions_timer: asyncio.TimerHandle | None = None
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
        # Set (on the loop) if the writer thread ever ends other than by close(): the
        # service waits on it and exits, rather than answer nothing while looking alive.
        self.writer_failed: asyncio.Future[str] | None = None
        self.on_commit: Callable[[int, float], None] | None = None  # (records, seconds)
        self.last_commit_failed = False  # for /readyz: the disk refuses writes right now
        self.on_rollback: OnRollback | None = None
        self.seq_states: dict[str, SeqState] = {}  # as saved, read once at open
        # What waits for a record's PUBACK (cluster.ack = "broker"): by the appended
        # object until it is committed, then by its id until the publisher deletes it.
        self._awaiting_commit: dict[int, Callable[[], None]] = {}
        self._awaiting_publish: dict[int, Callable[[], None]] = {}
        self._first_new_id = 1  # records below it were in the file at open
        self.unpublished_from_before = 0  # of those, not yet deleted (published)
        # Writer thread only: the next record id, accepts logged since the last fold and
        # the devices they touched, and when a failed fold may be tried again.
        self._next_id = 1
        self._logged = 0
        self._unfolded: set[str] = set()
        self._fold_not_before = 0.0

    # -- lifecycle ---------------------------------------------------------------
    async def __aenter__(self) -> Spool:
        self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.writer_failed = self._loop.create_future()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = _connect(self.path)
        except (OSError, sqlite3.Error) as e:
            raise SpoolError(f"cannot open spool {self.path}: {e}") from e
        try:
            _upgrade(db)
            _repage(db, self.path)
            self.seq_states = fold_seq_log(db)
            count, size, last_id = db.execute(
                "SELECT count(*), coalesce(sum(length(topic) + length(payload)), 0), "
                "coalesce(max(id), 0) FROM records"
            ).fetchone()
        except (OSError, sqlite3.Error, SpoolError) as e:
            db.close()
            if isinstance(e, SpoolError):
                raise
            raise SpoolError(f"cannot open spool {self.path}: {e}") from e
        self._records = count
        self._next_id = self._first_new_id = last_id + 1
        self.unpublished_from_before = count
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
        self._hand_over_deletions(due=False)
        # What the last commits' callbacks append (a new device's `online` status) would
        # queue behind the stop and never be written: wait until nothing is uncommitted.
        failed = self.writer_failed
        assert failed is not None  # made by open(), with the writer
        while self._uncommitted and self._writer.is_alive() and not failed.done():
            drained = asyncio.ensure_future(self._drained.wait())
            waits: tuple[asyncio.Future[Any], ...] = (drained, failed)
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            drained.cancel()
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
               accepted_seq: SeqAccept | None = None,
               on_published: Callable[[], None] | None = None,
               waiting_since: float | None = None) -> None:
        """Queue a record; `on_durable(True)` runs on the loop once it is committed.
        `accepted_seq` updates the device's saved replay window in the same transaction.
        `on_published` runs once the broker acknowledged it (the publisher deletes it).
        `waiting_since` (time.monotonic(), default now): when its uplink was received; the
        linger counts from there, so a wait before the append does not add to it."""
        if on_published is not None:
            self._awaiting_commit[id(record)] = on_published
        self._bytes += record_size(record)
        self._uncommitted += 1
        self._drained.clear()
        item = (record, on_durable, accepted_seq,
                time.monotonic() if waiting_since is None else waiting_since)
        if self._together is not None:
            self._together.append(item)
        else:
            self._queue.put(item)
            self._wake_if_sooner(item[3] + self.linger_s)
            self._hand_over_deletions(due=False)

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Hold the appends made inside and hand them to the writer in one piece (at most
        max_batch each) when the scope ends. For datagrams read in one batch after a wait:
        the writer, woken by the first append, would otherwise commit a few and leave the
        rest for the next commit, and a record appended with no uplink stamp (a status,
        a dead letter) would make it linger anew (docs/decisions.md)."""
        if self._together is not None:  # nested: the outer scope hands them over
            yield
            return
        held: list[_Append] = []
        self._together = held
        try:
            yield
        finally:
            self._together = None
            for start in range(0, len(held), self.max_batch):
                self._queue.put(_Together(held[start:start + self.max_batch]))
            if held:
                self._wake_if_sooner(_due(held, self.linger_s, None))
                self._hand_over_deletions(due=False)

    def _wake_if_sooner(self, due: float) -> None:
        """A piece due at `due` appended: if the writer lingers until later, it ends its
        wait. Pieces due later (statuses after a commit, single appends) ride without
        waking it."""
        until = self._linger_until
        if until is not None and due < until:
            self._sooner.set()

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
        waiting = self._awaiting_publish
        # Only while records from before the start remain or a 2.04 waits for its PUBACK
        # (cluster.ack = broker): on one host the publisher's path stays as it was.
        for r in records if self.unpublished_from_before or waiting else ():
            if r.spool_id < self._first_new_id:
                self.unpublished_from_before -= 1
            elif waiting:
                published = waiting.pop(r.spool_id, None)
                if published is not None:
                    try:
                        published()
                    except Exception:  # one broken callback must not strand the rest
                        log.exception("callback of a published spool record failed")
        self._deletes_pending += len(records)
        self._deleted.clear()
        self._deletions_held.extend(r.spool_id for r in records)
        if self._deletions_timer is None and self._loop is not None:
            self._deletions_timer = self._loop.call_later(DELETE_LINGER_S,
                                                          self._hand_over_deletions)

    def _hand_over_deletions(self, due: bool = True) -> None:
        """Queue the held deletions: behind an append (`due=False`, they ride with its
        commit or the next), or alone after DELETE_LINGER_S, to be committed at once."""
        if self._deletions_timer is not None:
            self._deletions_timer.cancel()
            self._deletions_timer = None
        if self._deletions_held:
            ids, self._deletions_held = self._deletions_held, []
            self._queue.put(_DueDeletions(ids) if due else ids)

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
        for offset, (record, _, _, _) in enumerate(batch):
            self._mem.append(Record(record.topic, record.payload, record.retain, first_id + offset))
            self._mem_bytes += record_size(record)

    # -- the writer thread -------------------------------------------------------
    def _write_loop(self, db: sqlite3.Connection) -> None:
        """Commit batches until close(). Nothing a batch raises ends the loop; if the loop
        itself dies, `writer_failed` says why and the service stops."""
        retry: list[int] = []  # deletions of a failed commit, to try again
        try:
            stopping = False
            while not stopping:
                batch, deletions, stopping = self._next_batch(retry)
                if batch or deletions:
                    db, ok = self._commit(db, batch, deletions)
                    retry = [] if ok else deletions
                if self._logged >= SEQ_FOLD_ROWS or (stopping and self._logged):
                    db = self._fold(db, stopping)
        except BaseException as e:
            log.critical("spool writer thread died: %r; nothing can be made durable, "
                         "the gateway stops", e, exc_info=True)
            self._signal_failure(f"spool writer thread died: {e!r}")
        finally:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def _next_batch(self, retry: list[int]) -> tuple[list[_Append], list[int], bool]:
        """Wait for the next group: appends that arrived within `linger_s` of the oldest
        (at most max_batch), and every deletion queued meanwhile. Appends that queued up
        during the previous commit are already due, so a busy gateway never lingers.
        While lingering the thread sleeps, woken only by a piece due before its wait ends
        (`_wake_if_sooner`): at most one wake-up and one GIL hand-over per batch, not per
        uplink (docs/decisions.md). A piece from `together()` is never split between two
        commits."""
        batch: list[_Append] = []
        deletions: list[int] = list(retry)
        deadline = time.monotonic() + RETRY_S if retry else None
        item: _Append | _Together | _DueDeletions | list[int] | None
        if self._carried is not None:
            item, self._carried = self._carried, None
        else:
            try:
                item = self._queue.get(timeout=RETRY_S if retry else None)
            except queue.Empty:
                return batch, deletions, False
        # Deletions alone: wait (woken by each item) for an append to ride with.
        while isinstance(item, list):
            deletions.extend(item)
            if deadline is None:
                deadline = time.monotonic() + DELETE_LINGER_S
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return batch, deletions, False
        if item is None:
            return batch, deletions, True
        if isinstance(item, _DueDeletions):  # they waited on the loop already
            deletions.extend(item.ids)
            return batch, deletions, False
        if isinstance(item, _Together):
            batch.extend(item.appends)
        else:
            batch.append(item)
        # Never longer than the linger, whatever the clock did since the append.
        until = time.monotonic() + min(self.linger_s, _due(batch, self.linger_s, deadline)
                                       - time.monotonic())
        while len(batch) < self.max_batch:
            remaining = until - time.monotonic()
            if remaining > 0:
                # Lingering: a piece due sooner (a gathered batch appended behind a
                # device's `online` status) ends the wait instead of waiting behind it
                # (docs/decisions.md, "The linger follows the earliest due"). Published
                # before the queue is looked at, so an append that misses the look sees it.
                self._linger_until = until
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if remaining <= 0:
                    break
                self._sooner.wait(remaining)
                self._sooner.clear()  # whatever set it is in the queue by now
                continue
            finally:
                self._linger_until = None
            if item is None:
                return batch, deletions, True
            if isinstance(item, _Together):
                if len(batch) + len(item.appends) > self.max_batch:
                    self._carried = item  # whole, in the next commit
                    break
                batch.extend(item.appends)
                until = min(until, _due(item.appends, self.linger_s, deadline))
            elif isinstance(item, _DueDeletions):
                deletions.extend(item.ids)
            elif isinstance(item, list):
                deletions.extend(item)
            else:
                batch.append(item)
                until = min(until, _due([item], self.linger_s, deadline))
        return batch, deletions, False

    def _commit(
        self,
        db: sqlite3.Connection,
        batch: list[_Append],
        deletions: list[int],
    ) -> tuple[sqlite3.Connection, bool]:
        """One transaction: deletions, the batch's records and its accepts. On any error
        it is rolled back whole (records, accepts, the writer's window, the ids) and its
        records are answered 5.03; returns the connection to go on with."""
        started = time.perf_counter()
        window = self._saved_seqs
        before: dict[str, SeqState | None] = {}  # to roll the window back with the transaction
        accepts: list[SeqAccept] = []
        first_id = self._next_id
        error: BaseException | None = None
        try:
            for _, _, accepted, _ in batch:
                if accepted is not None:
                    device_id = accepted[0]
                    if device_id not in before:
                        before[device_id] = window.snapshot(device_id)
                    window.accept(*accepted)
                    accepts.append(accepted)
            db.execute("BEGIN")
            if deletions:
                db.executemany("DELETE FROM records WHERE id BETWEEN ? AND ?",
                               _id_ranges(deletions))
            _execute_rows(db, _INSERT_RECORDS, [(first_id + i, r.topic, r.payload, r.retain)
                                                for i, (r, _, _, _) in enumerate(batch)])
            if accepts:
                _execute_rows(db, _INSERT_SEQ_LOG, [_log_row(a) for a in accepts])
            db.execute("COMMIT")
        except Exception as e:  # SQLITE_FULL, IOERR, a bad value: this batch only
            error = e
        ok = error is None
        if ok:
            self._next_id += len(batch)
            self._logged += len(accepts)
            self._unfolded.update(before)
        else:
            log.error("spool commit of %d records and %d deletions failed: %s; the devices "
                      "were answered 5.03 and will retry, the deletions are retried",
                      len(batch), len(deletions), error)
            db = self._roll_back(db)
            for device_id, state in before.items():
                window.restore(device_id, state)
        elapsed = time.perf_counter() - started
        rollback = (before, {(a[0], a[1]) for a in accepts}) if not ok and before else None
        self._to_loop(self._committed, batch, ok, elapsed, first_id,
                      len(deletions) if ok else 0, rollback)
        return db, ok

    def _roll_back(self, db: sqlite3.Connection) -> sqlite3.Connection:
        """End a failed transaction; reopen the file if even that failed."""
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        if not db.in_transaction:
            return db
        log.error("spool transaction still open after ROLLBACK: reopening %s", self.path)
        with contextlib.suppress(sqlite3.Error):
            db.close()
        return _connect(self.path)

    def _fold(self, db: sqlite3.Connection, stopping: bool) -> sqlite3.Connection:
        """Write the replay state of the devices logged since the last fold into
        device_seqs and empty seq_log, in one transaction (the writer's window already
        holds exactly what was committed). A failure keeps the log: it is tried later."""
        now = time.monotonic()
        if now < self._fold_not_before and not stopping:
            return db
        started = time.perf_counter()
        try:
            db.execute("BEGIN")
            _fold_into(db, self._saved_seqs, self._unfolded)
            db.execute("COMMIT")
        except Exception as e:
            log.error("spool: folding %d replay-state accepts into device_seqs failed: %s; "
                      "they stay in seq_log (read back at start), tried again in %.0f s",
                      self._logged, e, RETRY_S * 10)
            self._fold_not_before = now + RETRY_S * 10
            return self._roll_back(db)
        log.debug("spool: folded %d accepts of %d devices in %.3f s", self._logged,
                  len(self._unfolded), time.perf_counter() - started)
        self._logged = 0
        self._unfolded.clear()
        return db

    def _to_loop(self, callback: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(callback, *args)

    def _signal_failure(self, why: str) -> None:
        def fail() -> None:
            if self.writer_failed is not None and not self.writer_failed.done():
                self.writer_failed.set_result(why)
        self._to_loop(fail)

    def _committed(
        self, batch: list[_Append], ok: bool, elapsed: float, first_id: int, deleted: int,
        rollback: tuple[dict[str, SeqState | None], set[tuple[str, int]]] | None,
    ) -> None:
        self._uncommitted -= len(batch)
        self.last_commit_failed = not ok
        self._deletes_pending -= deleted
        if not self._deletes_pending:
            self._deleted.set()
        if self._awaiting_commit:
            for offset, (record, _, _, _) in enumerate(batch):
                published = self._awaiting_commit.pop(id(record), None)
                if published is not None and ok:
                    self._awaiting_publish[first_id + offset] = published
        if ok:
            self._records += len(batch)
            if batch:
                self._remember(batch, first_id)
                self._appended.set()
        else:
            self._bytes -= sum(record_size(r) for r, _, _, _ in batch)
        if self.on_commit is not None and ok:
            self.on_commit(len(batch), elapsed)
        try:
            if rollback is not None and self.on_rollback is not None:
                try:
                    self.on_rollback(*rollback)
                except Exception:
                    log.exception("rolling back the replay state of a failed commit failed")
            # What the callbacks append (a device's first uplink: its `online` status)
            # reaches the writer in one piece, due a linger from now.
            with self.together():
                for _, on_durable, _, _ in batch:
                    if on_durable is None:
                        continue
                    try:
                        on_durable(ok)
                    except Exception:  # one broken callback must not strand the rest
                        log.exception("callback of a committed spool record failed")
        finally:
            if not self._uncommitted:
                self._drained.set()
