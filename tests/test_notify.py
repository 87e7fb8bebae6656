"""The systemd notify protocol against a real AF_UNIX datagram socket standing in for systemd:
the module on its own (abstract and path addresses), then the gateway subprocess's lifecycle."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.runtime.notify import Notifier, notify, reloading_message, status_line, watchdog_interval_s
from tests.conftest import DEADLINE_S, Gateway, wait_for

WATCHDOG_USEC = 600_000  # a ping every 0.3 s: several arrive while a test runs


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET: collects every datagram, in order."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # as it goes into NOTIFY_SOCKET
        self.messages: list[str] = []
        sock.setblocking(False)

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return self.messages

    def lines(self) -> list[str]:
        """Every `KEY=value` line received, datagrams flattened in order."""
        return [line for message in self.drain() for line in message.splitlines()]

    def wait_line(self, predicate: Callable[[str], bool], what: str, after: int = 0) -> int:
        """Index of the first line at or after `after` that satisfies `predicate`."""

        def found() -> int | None:
            for i, line in enumerate(self.lines()[after:], start=after):
                if predicate(line):
                    return i + 1  # truthy even for the first line
            return None

        index: int = wait_for(found, what=what) - 1
        return index


async def poll(condition: Callable[[], bool], what: str) -> None:
    """`wait_for` for coroutines: the Notifier under test runs on this same loop."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {DEADLINE_S}s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def systemd_socket() -> Iterator[FakeSystemd]:
    # AF_UNIX paths are limited to 107 bytes: pytest's tmp_path can be longer than that.
    directory = tempfile.mkdtemp(prefix="sdnotify-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield FakeSystemd(sock, path)
    sock.close()
    shutil.rmtree(directory)


@pytest.fixture
def abstract_socket() -> Iterator[FakeSystemd]:
    name = f"nbiot-gateway-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    yield FakeSystemd(sock, "@" + name)
    sock.close()


@pytest.fixture
def gateway_under_systemd(
    gateway_factory: Callable[..., Gateway], systemd_socket: FakeSystemd
) -> Gateway:
    gw = gateway_factory(start=False)
    gw.env_extra["NOTIFY_SOCKET"] = systemd_socket.address
    gw.env_extra["WATCHDOG_USEC"] = str(WATCHDOG_USEC)
    gw.start()
    return gw


# -- the module on its own ------------------------------------------------------------------
def test_notify_reaches_an_abstract_socket(abstract_socket: FakeSystemd) -> None:
    sent = notify("READY=1\nSTATUS=testing", {"NOTIFY_SOCKET": abstract_socket.address})

    assert sent is True
    wait_for(abstract_socket.drain, what="a datagram on the abstract socket")
    assert abstract_socket.messages == ["READY=1\nSTATUS=testing"]


def test_notify_reads_notify_socket_from_the_environment(
    systemd_socket: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", systemd_socket.address)

    assert notify("STOPPING=1") is True
    wait_for(systemd_socket.drain, what="a datagram on the path socket")
    assert systemd_socket.messages == ["STOPPING=1"]


def test_notify_outside_systemd_or_with_systemd_gone_is_a_quiet_no_op(tmp_path: Path) -> None:
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": "@nbiot-gateway-test-nobody-listens"}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_watchdog_is_enabled_only_for_the_process_it_names() -> None:
    me, other = str(os.getpid()), str(os.getpid() + 1)

    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": other}) is None
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None


async def test_notifier_task_pings_the_watchdog_and_refreshes_status(
    abstract_socket: FakeSystemd,
) -> None:
    notifier = Notifier(lambda: "STATUS=fine",
                        {"NOTIFY_SOCKET": abstract_socket.address, "WATCHDOG_USEC": "100000"})
    notifier.start()
    try:
        await poll(lambda: abstract_socket.lines().count("WATCHDOG=1") >= 3, "3 watchdog pings")
    finally:
        await notifier.stop()

    lines = abstract_socket.lines()
    assert lines.count("WATCHDOG=1") >= 3
    assert lines.count("STATUS=fine") >= 3  # as often as the watchdog when that is faster
    assert set(lines) == {"WATCHDOG=1", "STATUS=fine"}


async def test_notifier_keeps_pinging_when_the_status_text_fails(
    abstract_socket: FakeSystemd, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_status() -> str:
        raise ZeroDivisionError("bug in the status text")

    notifier = Notifier(broken_status,
                        {"NOTIFY_SOCKET": abstract_socket.address, "WATCHDOG_USEC": "100000"})
    notifier.start()
    try:
        await poll(lambda: abstract_socket.lines().count("WATCHDOG=1") >= 3, "3 watchdog pings")
    finally:
        await notifier.stop()

    assert abstract_socket.lines().count("WATCHDOG=1") >= 3
    assert "cannot build the systemd STATUS line" in caplog.text


def test_status_line_says_rate_broker_and_spool_fill() -> None:
    line = status_line(uplinks_per_s=12.34, broker_connected=False, spool_records=40,
                       spool_bytes=3 * 1024 * 1024, spool_max_bytes=1 << 30)

    assert line == ("STATUS=running: 12.3 uplinks/s, broker DISCONNECTED, spool 40 records, "
                    "3.0 MiB of 1.0 GiB (0.3%)")


def test_reloading_message_carries_clock_monotonic_in_microseconds() -> None:
    before = time.monotonic_ns() // 1000
    message = reloading_message()
    after = time.monotonic_ns() // 1000

    first, second = message.splitlines()
    assert first == "RELOADING=1"
    assert before <= int(second.removeprefix("MONOTONIC_USEC=")) <= after


# -- the gateway under a stand-in systemd ---------------------------------------------------
def test_gateway_reports_ready_then_pings_watchdog_and_status(
    gateway_under_systemd: Gateway, systemd_socket: FakeSystemd
) -> None:
    ready_at = systemd_socket.wait_line(lambda line: line == "READY=1", "READY=1")
    # Watchdog pings and STATUS refreshes keep coming after READY, from the event loop.
    wait_for(lambda: systemd_socket.lines()[ready_at:].count("WATCHDOG=1") >= 3,
             what="3 watchdog pings after READY=1")
    wait_for(lambda: sum(line.startswith("STATUS=") for line in systemd_socket.lines()[ready_at:])
             >= 3, what="3 STATUS lines after READY=1")
    # Once the publisher holds its connection, STATUS says so.
    systemd_socket.wait_line(lambda line: "broker connected" in line, "STATUS with broker connected")

    statuses = [line for line in systemd_socket.lines() if line.startswith("STATUS=")]
    assert all(re.fullmatch(r"STATUS=running: \d+\.\d uplinks/s, broker (connected|DISCONNECTED), "
                            r"spool \d+ records, .+ of 1\.0 GiB \(\d+\.\d%\)", s) for s in statuses)
    assert systemd_socket.lines().count("READY=1") == 1


def test_gateway_sighup_sends_reloading_then_ready(
    gateway_under_systemd: Gateway, systemd_socket: FakeSystemd
) -> None:
    assert gateway_under_systemd.proc is not None
    ready_at = systemd_socket.wait_line(lambda line: line == "READY=1", "READY=1")
    before_usec = time.monotonic_ns() // 1000

    gateway_under_systemd.proc.send_signal(signal.SIGHUP)

    reloading_at = systemd_socket.wait_line(lambda line: line == "RELOADING=1", "RELOADING=1",
                                            after=ready_at + 1)
    ready_again_at = systemd_socket.wait_line(lambda line: line == "READY=1", "READY=1 again",
                                              after=reloading_at + 1)
    after_usec = time.monotonic_ns() // 1000
    lines = systemd_socket.lines()
    assert lines[reloading_at + 1].startswith("MONOTONIC_USEC=")
    assert before_usec <= int(lines[reloading_at + 1].split("=")[1]) <= after_usec
    assert reloading_at < ready_again_at
    assert gateway_under_systemd.proc.poll() is None  # still running


def test_gateway_sigterm_sends_stopping_and_exits_0(
    gateway_under_systemd: Gateway, systemd_socket: FakeSystemd
) -> None:
    systemd_socket.wait_line(lambda line: line == "READY=1", "READY=1")

    returncode = gateway_under_systemd.stop(signal.SIGTERM)

    lines = systemd_socket.lines()
    assert returncode == 0
    assert "STOPPING=1" in lines
    stopping_at = lines.index("STOPPING=1")
    assert lines[stopping_at + 1].startswith("STATUS=stopping: ")
    assert "READY=1" not in lines[stopping_at:]
