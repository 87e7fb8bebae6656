"""Moving the workers' state files to a new worker count, on real SQLite files written and
read back by the real classes: 1 -> 3 -> 2 -> 1 with every row checked after each move
(spooled records in their device's new owner's spool, in order), an interruption at every
step of the protocol (and one real SIGKILL) resumed to the exact result, and the
refusals."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.model import Record
from gateway.pipeline.replay import ReplayWindow, Seen, SeqState
from gateway.runtime import rebalance as rb
from gateway.runtime.rebalance import RebalanceError, rebalance
from gateway.runtime.workers import owner, state_files
from gateway.store.downlink import Command, DownlinkStore
from gateway.store.liveness import LivenessStore
from gateway.store.spool import Spool

ROOT = Path(__file__).resolve().parent.parent
DEVICES = [f"dev-{i:02d}" for i in range(24)]
DEAD_LETTERS = "nbiot/plant/invalid"
Row = tuple[str, bytes, bool]
# The topics the gateway spools for a device (pipeline, liveness, downlink), as this test
# writes them; anything else (dead letters) belongs to no device.
DEVICE_TOPIC = re.compile(r"nbiot/plant/env_th/([^/]+)/(?:up|status|down/ack)")


def up(device: str) -> str:
    return f"nbiot/plant/env_th/{device}/up"


def new_owner(row: Row, workers: int) -> int:
    """Where a moved record belongs: its device's owner; worker 0 if it has no device."""
    match = DEVICE_TOPIC.fullmatch(row[0])
    return owner(match[1], workers) if match else 0


@dataclass
class Model:
    """What the files must hold: records per worker file of the current layout, in order."""

    workers: int = 1
    records: dict[int, list[Row]] = field(default_factory=dict)
    window: ReplayWindow = field(default_factory=ReplayWindow)
    seen: dict[str, tuple[float, str]] = field(default_factory=dict)
    commands: dict[str, list[str]] = field(default_factory=dict)  # device -> ids, queue order

    def moved(self, workers: int) -> None:
        """Old file by old file, in order, each record to its new owner's file."""
        records: dict[int, list[Row]] = {}
        for k in sorted(self.records):
            for row in self.records[k]:
                records.setdefault(new_owner(row, workers), []).append(row)
        self.records = records
        self.workers = workers

    def total_records(self) -> int:
        return sum(map(len, self.records.values()))

    def seqs(self) -> dict[str, SeqState]:
        return {d: s for d in DEVICES if (s := self.window.snapshot(d)) is not None}


class Killed(BaseException):
    """Stands for kill -9: no `except Exception` cleanup runs."""


def paths(tmp: Path) -> tuple[Path, Path]:
    return tmp / "spool.sqlite", tmp / "liveness.sqlite"


async def add_state(tmp: Path, model: Model, round_: int, liveness: Path | None = None) -> None:
    """Each worker of the current layout gets records, replay windows, liveness rows and
    commands for the devices it owns, written by the real classes."""
    spool, default_liveness = paths(tmp)
    n = model.workers
    for k in range(n):
        files = state_files(spool, liveness or default_liveness, k, n)
        mine = [d for d in DEVICES if owner(d, n) == k]
        async with Spool(files.spool, 1 << 30) as sp:
            for i, device in enumerate(mine):
                seq, ts = round_ * 10 + i % 3, 1000.0 * round_ + i
                row = (up(device), b"r%d:%s" % (round_, device.encode()), False)
                sp.append(Record(*row), None, (device, seq, ts, Seen.NEW))
                model.window.accept(device, seq, ts, Seen.NEW)
                rows = [row]
                if i % 3 == 0:  # a retained status, a command's ack, a dead letter
                    rows += [(f"nbiot/plant/env_th/{device}/status", b"s%d" % round_, True),
                             (f"nbiot/plant/env_th/{device}/down/ack", b"a%d" % round_, False),
                             (DEAD_LETTERS, b"d%d:w%d:%s" % (round_, k, device.encode()), False)]
                for extra in rows[1:]:
                    sp.append(Record(*extra), None)
                model.records.setdefault(k, []).extend(rows)
        LivenessStore(files.liveness).save([(d, 100.0 * round_, "online") for d in mine])
        model.seen.update({d: (100.0 * round_, "online") for d in mine})
        ids = [f"c{round_}-{j}" for j in (2, 0, 1)]  # queue order is not id order
        commands = [Command(d, c, {"id": c, "n": j}, 9e9)
                    for d in mine[:3] for j, c in enumerate(ids)]
        DownlinkStore(files.downlink).apply(commands, [])
        for d in mine[:3]:
            model.commands.setdefault(d, []).extend(ids)


async def check(tmp: Path, model: Model, liveness: Path | None = None) -> None:
    """Every file of the layout opens with its real class and holds exactly its share;
    nothing else is left in the directories (no old layout, temporary file or plan)."""
    spool, default_liveness = paths(tmp)
    liveness = liveness or default_liveness
    n = model.workers
    seqs: dict[str, SeqState] = {}
    seen: dict[str, tuple[float, str]] = {}
    commands: dict[str, list[str]] = {}
    expected_names = {"workers"}
    for k in range(n):
        files = state_files(spool, liveness, k, n)
        expected_names |= {p.name for p in files.all()}
        sp = Spool(files.spool, 1 << 30)
        sp.open()
        try:
            read = await sp.read_after(0, 1 << 20)
            assert [(r.topic, r.payload, r.retain) for r in read] == model.records.get(k, [])
            assert all(owner(d, n) == k for d in sp.seq_states)
            assert not seqs.keys() & sp.seq_states.keys()
            seqs.update(sp.seq_states)
        finally:
            await sp.close()
        loaded = LivenessStore(files.liveness).load()
        assert all(owner(d, n) == k for d in loaded) and not seen.keys() & loaded.keys()
        seen.update(loaded)
        for c in DownlinkStore(files.downlink).load():
            assert owner(c.device_id, n) == k
            commands.setdefault(c.device_id, []).append(c.command_id)
    assert seqs == model.seqs()
    assert seen == model.seen
    assert commands == model.commands
    assert (tmp / "workers").read_text() == f"{n}\n"
    layout = [state_files(spool, liveness, k, n) for k in range(n)]
    names = {p.parent / p.name for f in layout for p in f.all()} | {tmp / "workers"}
    on_disk = {p for d in {tmp, liveness.parent} for p in d.iterdir()}
    assert on_disk == names


def snapshot(*directories: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for d in directories for p in d.iterdir()}


def crash_at(monkeypatch: pytest.MonkeyPatch, step: str, calls_before: int) -> None:
    """Make rebalance's `step` die (Killed) when called after `calls_before` calls."""
    real: Callable[..., Any] = getattr(rb, step)
    calls = 0

    def dying(*args: Any) -> Any:
        nonlocal calls
        if calls == calls_before:
            raise Killed(step)
        calls += 1
        return real(*args)

    monkeypatch.setattr(rb, step, dying)


# -- the happy path -------------------------------------------------------------------------
async def test_moves_1_to_3_to_2_to_1_keep_every_row_in_its_owner_files(tmp_path: Path) -> None:
    spool, liveness = paths(tmp_path)
    model = Model()
    await add_state(tmp_path, model, 1)
    assert rebalance(spool, liveness, 1) is None  # the marker is written, nothing moves
    await check(tmp_path, model)
    for round_, workers in enumerate((3, 2, 1), start=2):
        summary = rebalance(spool, liveness, workers)
        before = model.workers
        model.moved(workers)
        total = model.total_records()
        assert summary is not None and summary.startswith(f"state moved from {before} worker")
        assert f"to {workers}: {total:,} records, {len(model.seqs())} replay windows" in summary
        await check(tmp_path, model)
        untouched = snapshot(tmp_path)
        assert rebalance(spool, liveness, workers) is None
        assert snapshot(tmp_path) == untouched
        await add_state(tmp_path, model, round_)  # records in several files for the next move
        await check(tmp_path, model)


async def test_liveness_in_another_directory_moves_there(tmp_path: Path) -> None:
    directory, liveness = tmp_path / "var", tmp_path / "alive" / "alive.db"
    model = Model()
    await add_state(directory, model, 1, liveness)
    for workers in (2, 1):
        assert rebalance(directory / "spool.sqlite", liveness, workers) is not None
        model.moved(workers)
        await check(directory, model, liveness)


def test_fresh_install_writes_the_marker_only(tmp_path: Path) -> None:
    directory = tmp_path / "var"
    assert rebalance(directory / "spool.sqlite", directory / "liveness.sqlite", 3) is None
    assert {p.name for p in directory.iterdir()} == {"workers"}
    assert (directory / "workers").read_text() == "3\n"


async def test_files_from_before_the_marker_are_read_as_their_layout(tmp_path: Path) -> None:
    spool, liveness = paths(tmp_path)
    model = Model(workers=4)
    await add_state(tmp_path, model, 1)
    state_files(spool, liveness, 3, 4).liveness.unlink()  # a missing liveness file is normal
    model.seen = {d: v for d, v in model.seen.items() if owner(d, 4) != 3}
    before = snapshot(tmp_path)
    assert rebalance(spool, liveness, 4) is None
    after = snapshot(tmp_path)
    assert after.pop(tmp_path / "workers")[0] == b"4\n" and after == before
    assert rebalance(spool, liveness, 1) is not None
    model.moved(1)
    await check(tmp_path, model)


async def test_rows_of_one_device_in_several_files_merge_to_the_newest(tmp_path: Path) -> None:
    spool, liveness = paths(tmp_path)
    device = DEVICES[0]
    old = [state_files(spool, liveness, k, 2) for k in range(2)]
    for files, seq, seen_at in ((old[0], 40, 9.0), (old[1], 30, 5.0)):
        async with Spool(files.spool, 1 << 30) as sp:
            sp.append(Record("t", b"x"), None, (device, seq, float(seq), Seen.NEW))
        LivenessStore(files.liveness).save([(device, seen_at, f"at-{seen_at}")])
    DownlinkStore(old[0].downlink).apply([Command(device, c, {"w": 0}, 9e9) for c in "zab"], [])
    DownlinkStore(old[1].downlink).apply([Command(device, c, {"w": 1}, 9e9) for c in "yb"], [])
    assert rebalance(spool, liveness, 1) is not None
    sp = Spool(spool, 1 << 30)
    sp.open()
    try:
        assert sp.seq_states == {device: (40, 1, 40.0)}  # the highest hwm, the first file
    finally:
        await sp.close()
    assert LivenessStore(liveness).load() == {device: (9.0, "at-9.0")}  # the latest seen_at
    loaded = DownlinkStore(tmp_path / "downlink.sqlite").load()
    # File by file, in queue order; on a clash the first file's command stays.
    assert [(c.command_id, c.body["w"]) for c in loaded] == [
        ("z", 0), ("a", 0), ("b", 0), ("y", 1)]


def uplink(device: str, seq: int) -> Record:
    return Record(up(device), json.dumps({"device_id": device, "seq": seq}).encode())


async def test_a_backlog_goes_to_each_devices_new_owner_in_its_order(tmp_path: Path) -> None:
    """Two workers' spools as a move to worker 0 left them: worker 0 holds every device's
    seq 1 and 2, each owner its devices' seq 3, each file a dead letter. After the move to
    3 workers each spool holds its own devices' records in seq order, numbered 1, 2, ...
    (the spool's `records` has no AUTOINCREMENT: the writer numbers on from the highest),
    the dead letters in worker 0 file by file, and what the owner appends next comes after."""
    spool, liveness = paths(tmp_path)
    old = [state_files(spool, liveness, k, 2).spool for k in range(2)]
    async with Spool(old[0], 1 << 30) as sp:
        for record in [uplink(d, seq) for seq in (1, 2) for d in DEVICES]:
            sp.append(record, None)
        sp.append(Record(DEAD_LETTERS, b"from w0"), None)
    for k in range(2):
        async with Spool(old[k], 1 << 30) as sp:
            for device in [d for d in DEVICES if owner(d, 2) == k]:
                sp.append(uplink(device, 3), None)
            if k == 1:
                sp.append(Record(DEAD_LETTERS, b"from w1"), None)

    assert rebalance(spool, liveness, 3) is not None

    for k in range(3):
        mine = [d for d in DEVICES if owner(d, 3) == k]
        path = state_files(spool, liveness, k, 3).spool
        async with Spool(path, 1 << 30) as sp:
            for device in mine:
                sp.append(uplink(device, 4), None)
        sp = Spool(path, 1 << 30)
        sp.open()
        try:
            read = await sp.read_after(0, 1 << 20)
        finally:
            await sp.close()
        seqs: dict[str, list[int]] = {}
        for record in read:
            if record.topic != DEAD_LETTERS:
                message = json.loads(record.payload)
                seqs.setdefault(message["device_id"], []).append(message["seq"])
        assert mine and seqs == {d: [1, 2, 3, 4] for d in mine}
        dead = [r.payload for r in read if r.topic == DEAD_LETTERS]
        assert dead == ([b"from w0", b"from w1"] if k == 0 else [])
        assert [r.spool_id for r in read] == list(range(1, len(read) + 1))
    with closing(sqlite3.connect(path)) as db:
        has_sequence = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'")
        assert has_sequence.fetchone() is None


def test_the_device_of_a_record_is_read_from_the_topics_the_gateway_spools() -> None:
    assert rb.record_device("nbiot/plant/env_th/dev-1/up") == "dev-1"
    assert rb.record_device("p/t/gas/a.b:c-d/status") == "a.b:c-d"
    assert rb.record_device("p/t/gas/dev-1/down/ack") == "dev-1"
    for topic in ("nbiot/plant/invalid", "nbiot/gateways/gw1/status", "p/t/gas//up",
                  "p/t/gas/dev-1/down", "t/dev-1/1", "p/t/x/gas/dev-1/up", ""):
        assert rb.record_device(topic) is None, topic


async def test_a_spool_from_before_retained_records_and_replay_windows(tmp_path: Path) -> None:
    spool, liveness = paths(tmp_path)
    rows = [(up(d), b"%d" % i) for i, d in enumerate(DEVICES[:6])] + [(DEAD_LETTERS, b"x")]
    with sqlite3.connect(spool) as db:
        db.execute("CREATE TABLE records (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                   "topic TEXT NOT NULL, payload BLOB NOT NULL)")
        db.executemany("INSERT INTO records (topic, payload) VALUES (?, ?)", rows)
    db.close()
    assert rebalance(spool, liveness, 2) is not None
    model = Model(records={0: [(topic, payload, False) for topic, payload in rows]})
    model.moved(2)
    assert len(model.records) == 2  # both workers got some
    await check(tmp_path, model)


# -- interruptions ----------------------------------------------------------------------------
async def three_workers(tmp: Path) -> Model:
    """State in three workers' files, so 3 -> 2 has old and new names in common."""
    model = Model(workers=3)
    await add_state(tmp, model, 1)
    await add_state(tmp, model, 2)
    assert rebalance(*paths(tmp), 3) is None
    return model


@pytest.mark.parametrize(("step", "calls_before", "resumed"), [
    ("_build_table", 3, False),  # temporary files half built, no plan yet
    ("_write_plan", 0, False),  # all built, no plan
    ("_delete_source", 0, True),  # plan written, nothing deleted
    ("_delete_source", 4, True),  # some sources deleted
    ("_write_plan", 1, True),  # all sources deleted, plan still says "delete"
    ("_install", 0, True),  # plan says "rename", nothing renamed
    ("_install", 2, True),  # new spool.w0 and liveness.w0 in place, old w1 and w2 gone
    ("_write_marker", 0, True),  # all renamed, marker still says 3
    ("_remove_plan", 0, True),  # marker says 2, plan still there
])
async def test_an_interrupted_move_ends_exactly_right(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str, calls_before: int,
        resumed: bool) -> None:
    spool, liveness = paths(tmp_path)
    model = await three_workers(tmp_path)
    with monkeypatch.context() as m:
        crash_at(m, step, calls_before)
        with pytest.raises(Killed):
            rebalance(spool, liveness, 2)
    summary = rebalance(spool, liveness, 2)
    assert summary is not None and summary.startswith("state moved from 3 workers to 2")
    assert summary.endswith("(resumed after an interruption)") == resumed
    model.moved(2)
    await check(tmp_path, model)


async def test_an_interrupted_move_is_finished_before_the_next_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, liveness = paths(tmp_path)
    model = await three_workers(tmp_path)
    with monkeypatch.context() as m:
        crash_at(m, "_install", 1)
        with pytest.raises(Killed):
            rebalance(spool, liveness, 2)
    summary = rebalance(spool, liveness, 1)
    assert summary is not None
    first, second = summary.split("; ")
    assert first.startswith("state moved from 3 workers to 2") and first.endswith("interruption)")
    assert second.startswith("state moved from 2 workers to 1")
    model.moved(2)
    model.moved(1)
    await check(tmp_path, model)


async def test_an_abandoned_build_is_removed_by_the_next_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, liveness = paths(tmp_path)
    model = await three_workers(tmp_path)
    with monkeypatch.context() as m:
        crash_at(m, "_write_plan", 0)
        with pytest.raises(Killed):
            rebalance(spool, liveness, 4)
    assert len(temporary_files(tmp_path)) == 12
    assert rebalance(spool, liveness, 3) is None  # then the operator went back to 3
    await check(tmp_path, model)


def temporary_files(directory: Path) -> list[Path]:
    return list(directory.glob("*.rebalance"))


def plant_stale_wal(target: Path) -> None:
    """A valid WAL of another database beside `target`: SQLite would replay it into it."""
    other = target.with_name("other.sqlite")
    db = sqlite3.connect(other, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE records (x)")  # would shadow the new file's schema if replayed
    Path(f"{target}-wal").write_bytes(Path(f"{other}-wal").read_bytes())
    db.close()
    other.unlink()


async def test_a_stale_wal_beside_a_target_is_not_replayed_into_it(tmp_path: Path) -> None:
    spool, liveness = paths(tmp_path)
    model = Model()
    await add_state(tmp_path, model, 1)
    plant_stale_wal(state_files(spool, liveness, 1, 2).spool)
    assert rebalance(spool, liveness, 2) is not None
    model.moved(2)
    await check(tmp_path, model)


async def test_sigkill_in_the_middle_of_the_renames(tmp_path: Path) -> None:
    spool, liveness = paths(tmp_path)
    model = await three_workers(tmp_path)
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from gateway.runtime import rebalance as rb\n"
        "real, done = rb._install, []\n"
        "def install(temp, target):\n"
        "    real(temp, target)\n"
        "    done.append(target)\n"
        "    if len(done) == 4:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "rb._install = install\n"
        "rb.rebalance(Path(sys.argv[1]), Path(sys.argv[2]), 2)\n"
    )
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script, str(spool), str(liveness)],
        cwd=ROOT, capture_output=True, timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert json.loads((tmp_path / "rebalance.plan").read_text())["phase"] == "rename"
    assert rebalance(spool, liveness, 2) is not None
    model.moved(2)
    await check(tmp_path, model)


async def test_an_unreadable_source_is_named_and_nothing_changes(tmp_path: Path) -> None:
    spool, liveness = paths(tmp_path)
    await three_workers(tmp_path)
    bad = state_files(spool, liveness, 1, 3).liveness
    bad.write_bytes(b"not a database" * 100)
    before = snapshot(tmp_path)
    with pytest.raises(RebalanceError, match=re.escape(str(bad))):
        rebalance(spool, liveness, 2)
    assert snapshot(tmp_path) == before  # no temporary file left, the sources as they were


# -- refusals -------------------------------------------------------------------------------
def touch_db(path: Path) -> None:
    sqlite3.connect(path).close()
    path.touch()


@pytest.mark.parametrize(("marker", "files", "named"), [
    (None, ["spool.sqlite", "spool.w0.sqlite"], ["spool.sqlite", "spool.w0.sqlite"]),
    (None, ["spool.w1.sqlite", "downlink.sqlite"], ["downlink.sqlite", "spool.w1.sqlite"]),
    ("2", ["spool.w0.sqlite", "liveness.w2.sqlite"], ["liveness.w2.sqlite", "workers"]),
    ("1", ["spool.sqlite", "spool.w0.sqlite"], ["spool.sqlite", "spool.w0.sqlite"]),
    ("3", ["spool.sqlite"], ["spool.sqlite", "workers"]),
    ("two", ["spool.sqlite"], ["workers"]),
])
def test_a_layout_it_cannot_explain_is_refused_untouched(
        tmp_path: Path, marker: str | None, files: list[str], named: list[str]) -> None:
    for name in files:
        touch_db(tmp_path / name)
    if marker is not None:
        (tmp_path / "workers").write_text(marker)
    before = snapshot(tmp_path)
    with pytest.raises(RebalanceError) as refused:
        rebalance(*paths(tmp_path), 2)
    assert all(str(tmp_path / name) in str(refused.value) for name in named), refused.value
    assert snapshot(tmp_path) == before


async def test_a_plan_whose_new_files_are_missing_deletes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool, liveness = paths(tmp_path)
    await three_workers(tmp_path)
    with monkeypatch.context() as m:
        crash_at(m, "_delete_source", 0)
        with pytest.raises(Killed):
            rebalance(spool, liveness, 2)
    lost = state_files(spool, liveness, 1, 2).downlink
    os.unlink(f"{lost}.rebalance")
    before = snapshot(tmp_path)
    with pytest.raises(RebalanceError, match=re.escape(f"{lost}.rebalance")):
        rebalance(spool, liveness, 2)
    assert snapshot(tmp_path) == before


def test_an_unreadable_plan_is_refused(tmp_path: Path) -> None:
    (tmp_path / "rebalance.plan").write_text("{\"workers\": 2")
    with pytest.raises(RebalanceError, match=re.escape(str(tmp_path / "rebalance.plan"))):
        rebalance(*paths(tmp_path), 2)


async def test_replay_accepts_not_yet_folded_move_with_their_device(tmp_path: Path) -> None:
    """A kill -9 leaves accepts in seq_log, not yet in device_seqs: a move folds them
    first, so each device's new owner knows its last seq."""
    spool, liveness = paths(tmp_path)
    async with Spool(spool, 1 << 30):
        pass  # a format-2 file
    with closing(sqlite3.connect(spool)) as db, db:
        db.executemany("INSERT INTO seq_log (device_id, seq, ts, reset) VALUES (?, ?, ?, 0)",
                       [(d, seq, float(seq)) for d in DEVICES for seq in (1, 2, 70)])

    assert rebalance(spool, liveness, 2) is not None

    seqs: dict[str, tuple[int, int, float | None]] = {}
    for k in range(2):
        sp = Spool(state_files(spool, liveness, k, 2).spool, 1 << 30)
        sp.open()
        try:
            seqs.update(sp.seq_states)
        finally:
            await sp.close()
    assert seqs == {d: (70, 1, 70.0) for d in DEVICES}
