"""Move the workers' state files to a new `gateway.workers` count, crash-safely.

Runs once, in one process, before any worker opens its files. The layout on disk is named
by a marker file `workers` in the spool's directory (inferred from the file names when it
is missing). When the count changed, every per-device row and every spooled record moves
to the files of its device's new owner (`gateway.workers.owner`), through this protocol,
which a kill -9 or a power loss at any point cannot break:

1. build the new layout in temporary files `<target>.rebalance` (durable, no WAL left);
   a temporary file without a plan is garbage, removed on the next start;
2. write the plan `rebalance.plan` (phase "delete"): from here on the move only goes forward;
3. delete every source file with its side files;
4. rewrite the plan (phase "rename"), then rename each temporary file over its target;
5. write the marker, remove the plan.

On entry an existing plan is resumed from its phase: deleting a missing file or renaming
an already renamed one is a no-op, so every step can run again. Anything it cannot make
sense of raises `RebalanceError` naming the files, rather than guessing.

Spooled records and their order. A record's device is read from its topic
(`{prefix}/{tenant}/{type}/{device_id}/up`, `.../status`, `.../down/ack`); a record of no
device (dead letters on `{prefix}/{tenant}/invalid`, any other shape) goes to worker 0.
Each target takes its records from the old spools in worker order (0, 1, ...), each in
id order, and numbers them 1, 2, ... in that order (explicit ids: never sqlite_sequence).
What holds, in each new spool:
- records that came from one old file keep their relative order; those of old file k
  come before those of old file k+1;
- every moved record comes before anything the worker appends later (the spool numbers
  new records after the highest id in the file).
So a device's records, which the old layout kept in its owner's file, all sit in its new
owner's spool in their order, and are published on one connection before its new
uplinks. Files left by an older rebalance that sent every record to worker 0 hold a
device's older records in worker 0, which is read first: they stay first too. Not
ordered, as before the move (each worker publishes on its own connection): records of
different devices and dead letters from different old files; and the `rejected` acks
that worker 0 writes for another worker's device (an oversized command) against that
device's other records. It never drops a record nor changes its topic, payload or retain
flag, and reads no `records` column but id, topic, payload and retain.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from gateway.runtime.workers import StateFiles, owner, state_files
from gateway.store.downlink import DownlinkStore
from gateway.store.liveness import LivenessStore
from gateway.store.spool import FORMAT_VERSION as SPOOL_FORMAT
from gateway.store.spool import PAGE_SIZE_BYTES as SPOOL_PAGE_SIZE
from gateway.store.spool import SCHEMA as SPOOL_SCHEMA
from gateway.store.spool import fold_seq_log

log = logging.getLogger(__name__)

MARKER = "workers"
PLAN = "rebalance.plan"
TEMP_SUFFIX = ".rebalance"
SIDE_SUFFIXES = ("-wal", "-shm", "-journal")
DELETE, RENAME = "delete", "rename"
_DEVICE_TOPIC_TAILS = (["up"], ["status"], ["down", "ack"])  # after `{p}/{t}/{type}/{id}/`

_COPY_SEQS = (
    "INSERT INTO device_seqs (device_id, hwm, bitmap, last_ts) "
    "SELECT device_id, hwm, bitmap, last_ts FROM src.device_seqs WHERE gw_owner(device_id) = ? "
    "ON CONFLICT(device_id) DO UPDATE SET hwm = excluded.hwm, bitmap = excluded.bitmap, "
    "last_ts = excluded.last_ts WHERE excluded.hwm > device_seqs.hwm"
)
_COPY_LAST_SEEN = (
    "INSERT INTO last_seen (device_id, seen_at, state) "
    "SELECT device_id, seen_at, state FROM src.last_seen WHERE gw_owner(device_id) = ? "
    "ON CONFLICT(device_id) DO UPDATE SET seen_at = excluded.seen_at, state = excluded.state "
    "WHERE excluded.seen_at > last_seen.seen_at"
)
_COPY_COMMANDS = (
    "INSERT INTO commands (device_id, command_id, body, expires_at, delivered) "
    "SELECT device_id, command_id, body, expires_at, delivered FROM src.commands "
    "WHERE gw_owner(device_id) = ? ORDER BY rowid ON CONFLICT DO NOTHING"
)


class RebalanceError(Exception):
    """The state files are in a shape rebalance cannot read or explain: it refuses to guess."""


@dataclass(frozen=True)
class _Plan:
    workers: int
    phase: str
    sources: tuple[Path, ...]
    renames: tuple[tuple[Path, Path], ...]  # (temporary file, target)
    summary: str

    def to_json(self) -> str:
        return json.dumps({"workers": self.workers, "phase": self.phase,
                           "sources": [str(p) for p in self.sources],
                           "renames": [[str(t), str(g)] for t, g in self.renames],
                           "summary": self.summary}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> _Plan:
        data = json.loads(text)
        plan = cls(int(data["workers"]), str(data["phase"]),
                   tuple(Path(p) for p in data["sources"]),
                   tuple((Path(t), Path(g)) for t, g in data["renames"]), str(data["summary"]))
        if plan.phase not in (DELETE, RENAME) or plan.workers < 1:
            raise ValueError(f"phase {plan.phase!r}, workers {plan.workers}")
        return plan

    def directories(self) -> set[Path]:
        return {p.parent for p in self.sources} | {g.parent for _, g in self.renames}


@dataclass(frozen=True)
class _Counts:
    records: int = 0
    seqs: int = 0
    seen: int = 0
    commands: int = 0

    def __add__(self, other: _Counts) -> _Counts:
        return _Counts(self.records + other.records, self.seqs + other.seqs,
                       self.seen + other.seen, self.commands + other.commands)


def rebalance(spool: Path, liveness: Path, workers: int) -> str | None:
    """Bring the state files to the layout of `workers` workers. Returns None when there was
    nothing to do, else a one-line summary for the log. Raises RebalanceError."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    spool, liveness = spool.absolute(), liveness.absolute()
    directory = spool.parent
    summaries: list[str] = []
    _remove(directory / f"{PLAN}.tmp")
    plan = _read_plan(directory / PLAN)
    if plan is not None:
        log.warning("resuming an interrupted move of the state files to %d workers", plan.workers)
        _carry_out(plan, directory)
        summaries.append(f"{plan.summary} (resumed after an interruption)")
    _remove_garbage(spool, liveness)
    old = _layout_on_disk(spool, liveness)
    if old is not None and old != workers:
        summaries.append(_move(spool, liveness, old, workers))
    elif _read_marker(directory) != workers:
        _write_marker(directory, workers)
    return "; ".join(summaries) or None


# -- the layout on disk -------------------------------------------------------------------
def _kinds(spool: Path, liveness: Path) -> tuple[Path, Path, Path]:
    """The single-worker names of the three kinds of state file."""
    return state_files(spool, liveness, 0, 1).all()


def _worker_pattern(configured: Path, tail: str = "") -> re.Pattern[str]:
    """`spool.sqlite` (group 1 None) or `spool.w{k}.sqlite` (group 1 = k), then `tail`."""
    return re.compile(rf"{re.escape(configured.stem)}(?:\.w(0|[1-9][0-9]*))?"
                      rf"{re.escape(configured.suffix)}{tail}")


def _found(spool: Path, liveness: Path) -> dict[Path, int | None]:
    """Every state file on disk -> its worker index (None: a single-worker name)."""
    found: dict[Path, int | None] = {}
    for configured in _kinds(spool, liveness):
        pattern = _worker_pattern(configured)
        for path in _listdir(configured.parent):
            if match := pattern.fullmatch(path.name):
                found[path] = None if match[1] is None else int(match[1])
    return found


def _layout_on_disk(spool: Path, liveness: Path) -> int | None:
    """The worker count of the files on disk (None: a fresh install), from the marker if
    there is one, else from the names; RebalanceError if the names contradict."""
    found = _found(spool, liveness)
    singles = sorted(p for p, k in found.items() if k is None)
    per_worker = sorted(p for p, k in found.items() if k is not None)
    if singles and per_worker:
        raise RebalanceError(
            f"both single-worker state files ({_names(singles)}) and per-worker ones "
            f"({_names(per_worker)}) exist, and no {PLAN} explains it: move the stale ones aside")
    marker = _read_marker(spool.parent)
    if marker is None:
        indexes = [k for k in found.values() if k is not None]
        return (max(indexes) + 1 if indexes else 1) if found else None
    strays = sorted(p for p, k in found.items()
                    if (k is None) != (marker == 1) or (k is not None and k >= marker))
    if strays:
        raise RebalanceError(f"{spool.parent / MARKER} says {marker} worker(s) but "
                             f"{_names(strays)} belong to another layout: move them aside")
    return marker


def _read_marker(directory: Path) -> int | None:
    path = directory / MARKER
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RebalanceError(f"cannot read {path}: {e}") from e
    if not text.strip().isdigit() or int(text) < 1:
        raise RebalanceError(f"{path} should hold a worker count, not {text[:40]!r}")
    return int(text)


def _write_marker(directory: Path, workers: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomically(directory / MARKER, f"{workers}\n")


def _read_plan(path: Path) -> _Plan | None:
    try:
        return _Plan.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RebalanceError(f"cannot read {path}, the plan of an interrupted move of the "
                             f"state files ({e}): inspect it and the files it names") from e


# -- moving ---------------------------------------------------------------------------------
def _move(spool: Path, liveness: Path, old: int, new: int) -> str:
    olds = [state_files(spool, liveness, k, old) for k in range(old)]
    news = [state_files(spool, liveness, k, new) for k in range(new)]
    try:
        counts = _build(olds, news)
    except (OSError, sqlite3.Error, RebalanceError):
        for files in news:  # the sources are untouched; free the disk space
            for target in files.all():
                _remove_db(_temp(target))
        raise
    summary = (f"state moved from {old} worker{'s' if old > 1 else ''} to {new}: "
               f"{counts.records:,} records, {counts.seqs:,} replay windows, "
               f"{counts.seen:,} liveness rows, {counts.commands:,} downlink commands")
    sources = tuple(p for files in olds for p in files.all() if p.exists())
    renames = tuple((_temp(t), t) for files in news for t in files.all())
    plan = _Plan(new, DELETE, sources, renames, summary)
    for directory in plan.directories():
        _fsync_dir(directory)  # the temporary files' names are durable before the plan
    _write_plan(spool.parent / PLAN, plan)
    _carry_out(plan, spool.parent)
    return summary


def _build(olds: list[StateFiles], news: list[StateFiles]) -> _Counts:
    spools = [f.spool for f in olds if f.spool.exists()]
    livenesses = [f.liveness for f in olds if f.liveness.exists()]
    downlinks = [f.downlink for f in olds if f.downlink.exists()]
    for source in spools:
        # Replay accepts not yet folded (a kill -9 leaves them in seq_log): one
        # transaction per file, which leaves it a valid spool whatever happens next.
        with closing(sqlite3.connect(source, isolation_level=None)) as db:
            fold_seq_log(db)
    counts = _Counts()
    for worker, files in enumerate(news):
        counts += _build_spool(files.spool, spools, worker, len(news))
        counts += _build_table(files.liveness, livenesses, worker, len(news),
                               _create_liveness, "last_seen", _COPY_LAST_SEEN)
        counts += _build_table(files.downlink, downlinks, worker, len(news),
                               _create_downlink, "commands", _COPY_COMMANDS)
    return counts


def _build_spool(target: Path, sources: list[Path], worker: int, workers: int) -> _Counts:
    """Worker `worker`'s spool: the records of the devices it owns (and, for worker 0, those
    of no device), sources in the order given (worker order), and the replay windows it
    owns."""
    with _building(target, _create_spool, workers) as db:
        for source in sources:
            with _attached(db, source):
                _copy_records(db, worker)
                if _has_table(db, "device_seqs"):
                    db.execute(_COPY_SEQS, (worker,))
        (records,) = db.execute("SELECT count(*) FROM records").fetchone()
        (seqs,) = db.execute("SELECT count(*) FROM device_seqs").fetchone()
    return _Counts(records=records, seqs=seqs)


def _build_table(target: Path, sources: list[Path], worker: int, workers: int,
                 create: Callable[[Path], None], table: str, copy: str) -> _Counts:
    """A liveness or downlink file holding the rows of `table` that `worker` owns."""
    with _building(target, create, workers) as db:
        for source in sources:
            with _attached(db, source):
                if _has_table(db, table):
                    db.execute(copy, (worker,))
        (rows,) = db.execute(f"SELECT count(*) FROM {table}").fetchone()
    return _Counts(seen=rows) if table == "last_seen" else _Counts(commands=rows)


def _copy_records(db: sqlite3.Connection, worker: int) -> None:
    """Append src's records that go to `worker`, in id order, numbered on from the highest
    id already in the file (a spool from before `retain` existed has no such column)."""
    columns = {row[1] for row in db.execute("PRAGMA src.table_info(records)")}
    if columns:
        retain = "retain" if "retain" in columns else "0"
        (last_id,) = db.execute("SELECT coalesce(max(id), 0) FROM records").fetchone()
        db.execute("INSERT INTO records (id, topic, payload, retain) "
                   f"SELECT ? + row_number() OVER (ORDER BY id), topic, payload, {retain} "
                   "FROM src.records WHERE gw_record_owner(topic) = ? ORDER BY id",
                   (last_id, worker))


def record_device(topic: str) -> str | None:
    """The device a spooled record belongs to, from the topics the gateway builds
    (pipeline, liveness, downlink): `{prefix}/{tenant}/{type}/{device_id}/up` or `/status`,
    `.../{device_id}/down/ack`. None for the rest (dead letters: `{prefix}/{tenant}/invalid`).
    No part of those may hold a `/` (config.TopicPart, registry.DEVICE_ID)."""
    parts = topic.split("/")
    return (parts[3] or None) if parts[4:] in _DEVICE_TOPIC_TAILS else None


def _has_table(db: sqlite3.Connection, table: str) -> bool:
    return db.execute("SELECT 1 FROM src.sqlite_master WHERE type = 'table' AND name = ?",
                      (table,)).fetchone() is not None


class _attached:
    """`with _attached(db, source):` source is schema `src`; errors name the file."""

    def __init__(self, db: sqlite3.Connection, source: Path) -> None:
        self.db, self.source = db, source

    def __enter__(self) -> None:
        try:
            self.db.execute("ATTACH DATABASE ? AS src", (str(self.source),))
        except sqlite3.Error as e:
            raise RebalanceError(f"cannot read {self.source}: {e}") from e

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: object) -> None:
        self.db.execute("DETACH DATABASE src")
        if isinstance(error, sqlite3.Error):
            raise RebalanceError(f"cannot read {self.source}: {error}") from error


@contextmanager
def _building(target: Path, create: Callable[[Path], None], workers: int
              ) -> Iterator[sqlite3.Connection]:
    """A connection to target's new temporary file, made with the real module's schema, in
    rollback-journal mode (no WAL beside it once closed) and synchronous=FULL; the file
    is fsynced once the connection is closed. SQL `gw_owner(device_id)` is its owner,
    `gw_record_owner(topic)` the worker a spooled record goes to."""
    path = _temp(target)
    _remove_db(path)
    create(path)
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("PRAGMA synchronous=FULL")
        db.create_function("gw_owner", 1, lambda device_id: _owner(device_id, workers),
                           deterministic=True)
        db.create_function("gw_record_owner", 1, lambda topic: _record_owner(topic, workers),
                           deterministic=True)
        yield db
    _fsync_file(path)


def _owner(device_id: object, workers: int) -> int:
    return owner(device_id, workers) if isinstance(device_id, str) else 0


def _record_owner(topic: object, workers: int) -> int:
    device_id = record_device(topic) if isinstance(topic, str) else None
    return 0 if device_id is None else owner(device_id, workers)


def _create_spool(path: Path) -> None:
    with closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA page_size={SPOOL_PAGE_SIZE}")
        db.executescript(SPOOL_SCHEMA)
        db.execute(f"PRAGMA user_version={SPOOL_FORMAT}")


def _create_liveness(path: Path) -> None:
    LivenessStore(path).save([])


def _create_downlink(path: Path) -> None:
    DownlinkStore(path).apply([], [])


# -- the irreversible part: the same code runs a new plan and resumes an interrupted one --
def _carry_out(plan: _Plan, directory: Path) -> None:
    if plan.phase == DELETE:
        missing = [t for t, _ in plan.renames if not t.exists()]
        if missing:
            raise RebalanceError(f"{directory / PLAN} is to delete {_names(plan.sources)} but "
                                 f"the new files {_names(missing)} are missing: nothing deleted")
        for source in plan.sources:
            _delete_source(source)
        _fsync_dirs(plan.directories())
        plan = replace(plan, phase=RENAME)
        _write_plan(directory / PLAN, plan)
    for temp, target in plan.renames:
        _install(temp, target)
    _fsync_dirs(plan.directories())
    _write_marker(directory, plan.workers)
    _remove_plan(directory / PLAN)


def _delete_source(source: Path) -> None:
    """Delete one file of the old layout with its side files (gone already: done)."""
    _remove_db(source)


def _install(temp: Path, target: Path) -> None:
    """Rename temp over target (done already if temp is gone and target exists)."""
    if temp.exists():
        for suffix in SIDE_SUFFIXES:  # a stale WAL would be replayed into the new file
            _remove(target.with_name(target.name + suffix))
        os.replace(temp, target)
    elif not target.exists():
        raise RebalanceError(f"neither {temp} nor {target} exists: the plan in "
                             f"{target.parent} cannot be completed")


def _write_plan(path: Path, plan: _Plan) -> None:
    _write_atomically(path, plan.to_json())


def _remove_plan(path: Path) -> None:
    _remove(path)
    _fsync_dir(path.parent)


# -- files ----------------------------------------------------------------------------------
def _temp(target: Path) -> Path:
    return target.with_name(target.name + TEMP_SUFFIX)


def _remove_garbage(spool: Path, liveness: Path) -> None:
    """Temporary files of a move that never got to write its plan."""
    for configured in _kinds(spool, liveness):
        pattern = _worker_pattern(configured, rf"{re.escape(TEMP_SUFFIX)}(?:-wal|-shm|-journal)?")
        for path in _listdir(configured.parent):
            if pattern.fullmatch(path.name):
                log.warning("removing %s, left by an interrupted move of the state files", path)
                _remove(path)


def _remove_db(path: Path) -> None:
    _remove(path)
    for suffix in SIDE_SUFFIXES:
        _remove(path.with_name(path.name + suffix))


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _write_atomically(path: Path, text: str) -> None:
    """Write to a temporary name, fsync, rename over `path`, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dirs(directories: Iterable[Path]) -> None:
    for directory in directories:
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    _fsync_file(directory)


def _listdir(directory: Path) -> list[Path]:
    return list(directory.iterdir()) if directory.is_dir() else []


def _names(paths: Iterable[Path]) -> str:
    return ", ".join(str(p) for p in paths)
