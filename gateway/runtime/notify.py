"""systemd's notify protocol, spoken directly on the `$NOTIFY_SOCKET` datagram socket:
READY / RELOADING / STOPPING / STATUS, and the watchdog ping sent from the event loop.

Outside systemd (no `$NOTIFY_SOCKET`) everything here is a no-op. It never raises and never
blocks the loop: a lost notification must not take the gateway down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

# STATUS is refreshed this often (and at least as often as the watchdog is pinged).
STATUS_INTERVAL_S = 5.0


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one notification (`KEY=value` lines) to `$NOTIFY_SOCKET`; True if it went out.

    Like `sd_notify(3)`: an address starting with `@` is in the abstract namespace.
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False  # unset, or a kind we do not speak (vsock: needs systemd >= 253)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # A full receive queue at systemd's end must not stall the event loop.
            sock.setblocking(False)
            sock.sendto(message.encode(), address)
    except OSError as e:
        log.debug("systemd notification %r not sent to %s: %s", message, address, e)
        return False
    return True


def reloading_message() -> str:
    """RELOADING=1 with the CLOCK_MONOTONIC timestamp systemd >= 253 asks for (harmless before)."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}"


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of `WATCHDOG_USEC`), or None when not asked for.

    Like `sd_watchdog_enabled(3)`: `WATCHDOG_PID`, when set, must be this process.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
        pid = int(env.get("WATCHDOG_PID") or os.getpid())
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 2 / 1_000_000


class UplinkRate:
    """Uplinks per second between two readings of a monotonically growing counter."""

    def __init__(self, total: float = 0.0, now: float | None = None) -> None:
        self._total = total
        self._at = time.monotonic() if now is None else now

    def per_s(self, total: float, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        elapsed = now - self._at
        rate = (total - self._total) / elapsed if elapsed > 0 else 0.0
        self._total, self._at = total, now
        return max(rate, 0.0)


def status_line(*, uplinks_per_s: float, broker_connected: bool, spool_records: int,
                spool_bytes: int, spool_max_bytes: int, state: str = "running") -> str:
    """The `STATUS=` text `systemctl status` shows, e.g.
    `STATUS=running: 12.5 uplinks/s, broker connected, spool 40 records, 1.2 MiB of 1.0 GiB (0.1%)`.
    """
    broker = "broker connected" if broker_connected else "broker DISCONNECTED"
    used = 100.0 * spool_bytes / spool_max_bytes if spool_max_bytes > 0 else 0.0
    return (f"STATUS={state}: {uplinks_per_s:.1f} uplinks/s, {broker}, "
            f"spool {spool_records} records, {_size(spool_bytes)} of {_size(spool_max_bytes)} "
            f"({used:.1f}%)")


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


class Notifier:
    """Owns the one task that pings the watchdog and refreshes STATUS from the event loop.

    The ping is sent by the loop itself on purpose: a loop stuck in blocking code stops
    pinging, and systemd restarts the service after `WatchdogSec=`. (`/metrics` is no such
    signal.) `status` builds a full `STATUS=...` line; it is called on the loop.
    """

    def __init__(self, status: Callable[[], str], environ: Mapping[str, str] | None = None,
                 alive: Callable[[], bool] | None = None) -> None:
        """`alive`: asked before each watchdog ping; False withholds it (the supervisor's
        way to have systemd restart the service when one of its workers is stuck)."""
        env = dict(os.environ if environ is None else environ)
        self._environ = env
        self._status = status
        self._alive = alive
        self.watchdog_interval_s = watchdog_interval_s(env)
        self.status_interval_s = min(STATUS_INTERVAL_S, self.watchdog_interval_s or STATUS_INTERVAL_S)
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._environ.get("NOTIFY_SOCKET"))

    def send(self, message: str) -> bool:
        return notify(message, self._environ)

    def start(self) -> None:
        """Start the periodic task (only under systemd); `stop()` cancels it."""
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="systemd-notify")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_ping = next_status = loop.time()
        while True:
            now = loop.time()
            if self.watchdog_interval_s is not None and now >= next_ping:
                if self._alive is None or self._alive():
                    self.send("WATCHDOG=1")
                else:
                    log.error("not pinging the systemd watchdog: a worker is not answering")
                next_ping = now + self.watchdog_interval_s
            if now >= next_status:
                self._send_status()
                next_status = now + self.status_interval_s
            wake = next_status if self.watchdog_interval_s is None else min(next_ping, next_status)
            await asyncio.sleep(max(wake - loop.time(), 0.0))

    def _send_status(self) -> None:
        try:
            line = self._status()
        except Exception:
            # A bug in the status text must not stop the watchdog pings.
            log.exception("cannot build the systemd STATUS line")
            return
        self.send(line)
