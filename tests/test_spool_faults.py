"""The spool's error paths on a real, really full filesystem (a small tmpfs this test
mounts): a failed commit fails its own records only, the writer thread survives anything
one batch raises, deletions of a failed commit are not lost, and the replay state that a
failed commit carried is rolled back exactly (issue 13, defects 1, 3 and 6)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.model import Record
from gateway.pipeline.replay import Seen, SeqState
from gateway.store.spool import Spool

DISK_BYTES = 4 << 20


@dataclass
class SmallDisk:
    path: Path

    def fill(self) -> None:
        """Take every free byte (the spool's next WAL frame cannot be written)."""
        fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for chunk in (1 << 16, 1 << 12, 1 << 9, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * chunk)
        finally:
            os.close(fd)

    def free(self) -> None:
        (self.path / "filler").unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root (CI and ./scripts/test run as root)")
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mountpoint)],
                   check=True)
    try:
        yield SmallDisk(mountpoint)
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def record(i: int) -> Record:
    return Record(f"t/dev/{i}", b"x" * 200)


async def append(spool: Spool, rec: Record, accepted: tuple[str, int, float | None, Seen] | None
                 = None) -> bool:
    outcome: list[bool] = []
    spool.append(rec, outcome.append, accepted)
    await asyncio.wait_for(spool.wait_committed(), 10)
    return outcome[0]


async def test_a_batch_that_raises_fails_alone_and_the_writer_goes_on(tmp_path: Path) -> None:
    async with Spool(tmp_path / "spool.sqlite", 1 << 30) as spool:
        # 2^64 does not fit an SQLite INTEGER: binding it raises OverflowError, which is no
        # sqlite3.Error (the writer used to die of it with a transaction open).
        failed = await append(spool, record(1), ("d", 2**64, None, Seen.NEW))
        after = await append(spool, record(2), ("d", 5, None, Seen.NEW))

        assert (failed, after) == (False, True)
        assert spool.records == 1
        assert spool.writer_failed is not None and not spool.writer_failed.done()


async def test_disk_full_then_freed_the_spool_commits_again(small_disk: SmallDisk) -> None:
    async with Spool(small_disk.path / "spool.sqlite", 1 << 30) as spool:
        assert await append(spool, record(0))
        small_disk.fill()
        during = [await append(spool, record(i)) for i in range(1, 40)]
        small_disk.free()
        after = await append(spool, record(99))

        assert False in during
        assert after
        read = await spool.read_after(0, 100)
    assert read[-1].topic == "t/dev/99"


async def test_deletions_of_a_failed_commit_are_committed_later_and_counted_once(
    small_disk: SmallDisk
) -> None:
    path = small_disk.path / "spool.sqlite"
    async with Spool(path, 1 << 30) as spool:
        for i in range(20):
            spool.append(record(i), None)
        await spool.wait_committed()
        acked = await spool.read_after(0, 20)
        small_disk.fill()
        spool.delete(acked)
        for i in range(20, 60):  # commits that carry the deletions and fail
            spool.append(record(i), None)
        await spool.wait_committed()
        small_disk.free()
        await asyncio.wait_for(spool.wait_deleted(), 10)
        records, size = spool.records, spool.size_bytes
    with sqlite3.connect(path) as db:
        (rows, stored_bytes) = db.execute(
            "SELECT count(*), coalesce(sum(length(topic) + length(payload) + 32), 0) "
            "FROM records").fetchone()
        (acked_left,) = db.execute("SELECT count(*) FROM records WHERE id <= ?",
                                   (acked[-1].spool_id,)).fetchone()
    assert acked_left == 0  # an acked row left behind would be published again
    assert (records, size) == (rows, stored_bytes)  # has_room counts what the file holds


async def test_a_failed_reset_rolls_the_devices_window_back_to_what_the_file_holds(
    small_disk: SmallDisk
) -> None:
    """A rebooted device's counter reset that fails to commit: the loop is handed the
    state the file still holds, so its retry is judged a reset again (not NEW against the
    rolled-back reset, which made the writer set bit 999 and die)."""
    rollbacks: list[tuple[dict[str, SeqState | None], set[tuple[str, int]]]] = []
    path = small_disk.path / "spool.sqlite"
    async with Spool(path, 1 << 30) as spool:
        spool.on_rollback = lambda before, failed: rollbacks.append((before, failed))
        assert await append(spool, record(0), ("dev", 1000, 50.0, Seen.NEW))
        small_disk.fill()
        ok = [await append(spool, record(1), ("dev", 1, 60.0, Seen.RESET)) for _ in range(30)]
        small_disk.free()
        # What the old pipeline then sent: seq 1 judged NEW against its forgotten reset.
        stray = await append(spool, record(2), ("dev", 1, 60.0, Seen.NEW))
        retry = await append(spool, record(3), ("dev", 1, 60.0, Seen.RESET))

        assert False in ok
        assert rollbacks[0] == ({"dev": (1000, 1, 50.0)}, {("dev", 1)})
        assert (stray, retry) == (True, True)
        assert not spool.writer_failed.done()  # type: ignore[union-attr]
    reopened = Spool(path, 1 << 30)
    reopened.open()
    try:
        assert reopened.seq_states["dev"] == (1, 1, 60.0)
    finally:
        await reopened.close()


async def test_if_the_writer_thread_dies_the_loop_is_told(tmp_path: Path) -> None:
    """Not one batch failing but the loop itself (a bug): `writer_failed` resolves, and
    the service, which waits on it, exits instead of answering nothing while healthy."""
    spool = Spool(tmp_path / "spool.sqlite", 1 << 30)
    spool.open()
    try:
        spool._queue.put(("not a queue item",))  # type: ignore[arg-type]
        assert spool.writer_failed is not None
        why = await asyncio.wait_for(spool.writer_failed, 10)
        assert "spool writer thread died" in why
    finally:
        await spool.close()


async def test_a_callback_that_raises_does_not_strand_the_others(tmp_path: Path) -> None:
    outcomes: list[bool] = []

    def broken(ok: bool) -> None:
        raise RuntimeError("a broken reply path")

    async with Spool(tmp_path / "spool.sqlite", 1 << 30, linger_s=0.05) as spool:
        spool.append(record(1), broken)  # all three share one commit (the linger)
        spool.append(record(2), outcomes.append)
        spool.append(record(3), outcomes.append)
        await asyncio.wait_for(spool.wait_committed(), 10)

    assert outcomes == [True, True]
