""""2.04 only once durable", proven on the running gateway's system calls rather than by a
kill -9 (the page cache survives a process's death, so no crash test sees a missing fsync):
under strace, every reply leaves after the fdatasync of the spool's WAL that holds its
uplink, and a duplicate that arrives while its original's commit is held (an fdatasync
delayed by strace's fault injection) is not answered before that commit ends.

Checked to bite: with `PRAGMA synchronous=NORMAL` in spool._connect (WAL commits then skip
the fdatasync) the first test fails; with the pipeline answering a duplicate of a pending
seq at once (as if already durable) the second fails."""

from __future__ import annotations

import itertools
import re
import shutil
import sqlite3
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import pytest

from gateway.store.spool import _connect
from tests.coap_raw import RawCoap, uplink_request
from tests.conftest import DEVICES, Broker, SandboxedGateway

TH = DEVICES[0]
LINE = re.compile(r"^(\d+) +(?:<\.\.\. (\w+) resumed>|(\w+)\((.*))")


@dataclass
class Event:
    line: int
    pid: int
    call: str
    args: str  # the first argument with its strace -y annotation, e.g. "7</x/spool.sqlite-wal>"
    done: bool  # the call returned on this line
    failed: bool = False  # it returned -1 (EAGAIN: no datagram waiting)


def events(trace: Path) -> list[Event]:
    """Syscall entries and exits in the order strace saw them (one tracer: a total order)."""
    out: list[Event] = []
    unfinished: dict[int, Event] = {}
    for n, text in enumerate(trace.read_text(errors="replace").splitlines()):
        m = LINE.match(text)
        if m is None:
            continue
        pid = int(m.group(1))
        if m.group(2):  # "<... fdatasync resumed>"
            started = unfinished.pop(pid, None)
            if started is not None:
                out.append(Event(n, pid, started.call, started.args, True, "= -1 " in text))
            continue
        call, rest = m.group(3), m.group(4)
        event = Event(n, pid, call, rest.split(",")[0], "<unfinished ...>" not in text,
                      "= -1 " in text)
        if not event.done:
            unfinished[pid] = event
        out.append(event)
    return out


def commit_of_wal_between(trace: list[Event], after: int, before: int) -> bool:
    return any(e.call in ("fdatasync", "fsync") and e.done and "spool.sqlite-wal" in e.args
               and after < e.line < before for e in trace)


def coap_io(trace: list[Event], port: int) -> list[Event]:
    """Datagrams received and sent on the gateway's CoAP socket, in order."""
    mine = f":{port}]"
    return [e for e in trace if mine in e.args and e.done and not e.failed
            and (e.call.startswith("recv") or e.call.startswith("send"))]


@pytest.fixture
def straced_gateway(broker: Broker, tmp_path: Path) -> Iterator[Callable[..., SandboxedGateway]]:
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is missing: run ./scripts/test, which installs it")
    made: list[SandboxedGateway] = []

    def start(*inject: str) -> SandboxedGateway:
        workdir = tmp_path / f"gw{len(made)}"
        workdir.mkdir()
        gw = SandboxedGateway(workdir, broker.port)
        gw.prefix = [strace, "-f", "-qq", "-yy", "-s", "64", "-o", str(workdir / "strace.txt"),
                     "-e", "trace=fdatasync,fsync,%net", *inject]
        gw.write_config()
        gw.start()
        made.append(gw)
        return gw

    yield start
    for gw in made:
        if gw.proc is not None:
            gw.kill()


def test_every_2_04_leaves_after_the_fdatasync_of_its_commit(
    straced_gateway: Callable[..., SandboxedGateway]
) -> None:
    gw = straced_gateway()
    with RawCoap(gw.coap_port) as device:
        replies = [device.exchange(uplink_request(gw.uri(TH), {"seq": seq, "temperature": 20.0}))
                   for seq in range(1, 9)]
    gw.stop()

    trace = events(gw.workdir / "strace.txt")
    io = coap_io(trace, gw.coap_port)
    pairs = [(a, b) for a, b in itertools.pairwise(io)
             if a.call.startswith("recv") and b.call.startswith("send")]
    assert [r.code for r in replies] == [aiocoap.CHANGED] * 8
    assert len(pairs) == 8, [(e.call, e.args) for e in io]
    unsynced = [n for n, (received, sent) in enumerate(pairs, 1)
                if not commit_of_wal_between(trace, received.line, sent.line)]
    assert unsynced == [], "replies sent with no WAL fdatasync since their request"


def test_a_duplicate_during_its_originals_commit_waits_for_that_commit(
    straced_gateway: Callable[..., SandboxedGateway], tmp_path: Path
) -> None:
    # Every fdatasync of the spool's WAL (-P: that file only) returns 0.5 s late: the
    # duplicate, sent right after its original, surely arrives mid-commit.
    wal = tmp_path / "gw0" / "spool.sqlite-wal"
    gw = straced_gateway("-e", "inject=fdatasync:delay_exit=500000", "-P", str(wal))
    body = {"seq": 5, "temperature": 20.0}
    with RawCoap(gw.coap_port) as original, RawCoap(gw.coap_port) as duplicate:
        original.send(uplink_request(gw.uri(TH), body))
        duplicate.send(uplink_request(gw.uri(TH), body))  # another port: NAT rebinding
        duplicate_code = duplicate.receive(timeout=20).code
        # The original is answered first, as its commit ends; a duplicate answered at
        # once (taken for durable already) would be here ~0.5 s before it.
        original_code = original.receive(timeout=0.001).code
    gw.stop()

    assert (original_code, duplicate_code) == (aiocoap.CHANGED, aiocoap.CHANGED)


def test_the_spool_connection_is_wal_with_full_synchronous(tmp_path: Path) -> None:
    db: sqlite3.Connection = _connect(tmp_path / "spool.sqlite")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        db.close()


if __name__ == "__main__":  # print the parsed trace of a run, for debugging
    for e in events(Path(sys.argv[1])):
        print(e)


def test_disk_writes_and_fsyncs_are_on_metrics(
    straced_gateway: Callable[..., SandboxedGateway]
) -> None:
    """What the commit policy is judged by, for the operator: bytes written by the process
    (its /proc/self/io) and the spool's transactions, each one fsync (strace counts them)."""
    gw = straced_gateway()
    written_before = gw.metric("nbiot_gateway_disk_write_bytes_total")
    commits_before = gw.metric("nbiot_gateway_spool_commit_seconds_count")
    with RawCoap(gw.coap_port) as device:
        for seq in range(1, 6):
            device.exchange(uplink_request(gw.uri(TH), {"seq": seq, "temperature": 20.0}))
    written = gw.metric("nbiot_gateway_disk_write_bytes_total") - written_before
    commits = gw.metric("nbiot_gateway_spool_commit_seconds_count") - commits_before
    gw.kill()

    wal_syncs = [e for e in events(gw.workdir / "strace.txt")
                 if e.call == "fdatasync" and e.done and "spool.sqlite-wal" in e.args]
    assert written >= 5 * 4096  # each commit at least one page of the WAL
    assert commits >= 5  # one device, one uplink at a time: a commit each
    assert len(wal_syncs) >= commits
