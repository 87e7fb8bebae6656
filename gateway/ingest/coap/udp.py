"""The plain-CoAP socket's transport: reads datagrams in batches, and at moderate rates lets
them gather first (up to the spool's commit linger, ~20 datagrams' worth), so one wake-up
of the event loop serves the uplinks that will share a commit anyway.

At 667 uplinks/s every datagram used to get a loop wake-up of its own (epoll, two receive
calls, cold caches each time), which made an uplink cost 1.7-2x what it costs a busy
gateway (docs/decisions.md, "Receiving in batches"). The wait never makes a reply later
than the linger already did: every datagram of a batch is stamped with the time the batch
was noticed, the spool's linger counts from that stamp, and a gathered batch reaches the
spool's writer in one piece (`Spool.together`). It never drops a datagram it read, and a
busy socket is read at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

# Datagrams read per loop turn at most, so replies and commits interleave with a storm.
MAX_BATCH = 64
# After a wait, everything that gathered is read in one turn (at most ~250 below
# GATHER_BELOW_PER_S), so it becomes one commit: read 64 at a time, the 120 of a wait at
# 4,000/s made two, the second waiting for the first's fsync (gateway ack p99 ~50 ms).
GATHERED_MAX_BATCH = 512
# Above this arrival rate the socket is read as soon as it is readable: a gateway this busy
# batches by itself (datagrams queue while it works), and a wait could leave it idle with
# datagrams waiting. Well under one loop's saturation (~14,000/s here).
GATHER_BELOW_PER_S = 5000.0
RATE_WINDOW_S = 0.1  # the arrival rate is judged over at least this long
RECV_BYTES = 65_535
# A readable socket waits as long as the spool's commit linger, at most this long.
GATHER_MAX_S = 0.050
# ...and no longer than it takes this many datagrams to arrive at the current rate: 20
# share one wake-up's fixed cost well, and are handled in ~1 ms. A longer wait at a
# higher rate adds the handling of a bigger batch to its first uplink's ack (at 2,000/s
# a 30 ms wait gathered ~70, handled in 3-8 ms after it: gateway ack p99 47 ms), and
# fewer, longer waits line up worse with the spool's linger, which still counts from each
# uplink's receipt: with 40 a commit at 4,000/s held 98 records, not 115 (docs/decisions.md).
GATHER_DATAGRAMS = 20

Address = tuple[Any, ...]
Received = tuple[float, float]  # (time.time(), time.monotonic()) when a batch was noticed
# Around a gathered batch: the spool's `together()`, so its records share one commit.
Together = Callable[[], AbstractContextManager[None]]


class BatchSink(Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def error_received(self, exc: Exception) -> None: ...

    def datagrams_received(self, datagrams: list[tuple[bytes, Address]],
                           received: Received) -> None: ...


class GatheringUdpTransport(asyncio.DatagramTransport):
    """A datagram transport over a bound, non-blocking UDP socket. `gather_s` (0: none) is
    how long a readable socket may wait before it is read while arrivals are moderate;
    `together` is entered around the handling of a batch read after such a wait."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, sink: BatchSink,
                 gather_s: float, together: Together | None = None) -> None:
        super().__init__({"socket": sock, "sockname": sock.getsockname()})
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._sink = sink
        self._gather_s = gather_s
        self._closing = False
        self._watching = False
        self._noticed: Received | None = None
        self._timer: asyncio.Handle | None = None
        self._unsent: deque[tuple[bytes, Address]] = deque()  # the socket's buffer was full
        self._window_start = loop.time()
        self._window_count = 0
        self._wait_s = gather_s  # the wait at the rate of the last window
        self._gathering = gather_s > 0
        self._together = together

    def start(self) -> None:
        self._sink.connection_made(self)
        self._watch()

    # -- receiving ---------------------------------------------------------------------
    def _watch(self) -> None:
        if not self._watching and not self._closing:
            self._loop.add_reader(self._fd, self._readable)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching:
            self._loop.remove_reader(self._fd)
            self._watching = False

    def _readable(self) -> None:
        self._noticed = (time.time(), time.monotonic())
        self._unwatch()
        if self._gathering:
            # One wake-up for what arrives in the next few ms (the device waits 0.4-5 s for
            # its reply; the spool's linger, counted from `noticed`, absorbs the wait).
            self._timer = self._loop.call_later(self._wait_s, self._read)
        else:
            self._read()

    def _read(self) -> None:
        """Read up to MAX_BATCH datagrams (GATHERED_MAX_BATCH after a wait); if there were
        that many, read on at the next loop turn. While gathering, what is left arrived
        during the wait and keeps the batch's stamp (a storm ends the gathering within
        RATE_WINDOW_S); a busy socket's next read is stamped when it is read, as the loop's
        own transport did (a socket that never drains would otherwise age one stamp)."""
        self._timer = None
        noticed = self._noticed
        assert noticed is not None
        datagrams: list[tuple[bytes, Address]] = []
        recvfrom = self._sock.recvfrom
        limit = GATHERED_MAX_BATCH if self._gathering else MAX_BATCH
        while len(datagrams) < limit:
            try:
                datagrams.append(recvfrom(RECV_BYTES))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # an ICMP error queued on the socket: not a datagram
                self._sink.error_received(e)
        if datagrams:
            scope = (self._together() if self._gathering and self._together is not None
                     else contextlib.nullcontext())
            with scope:
                self._sink.datagrams_received(datagrams, noticed)
        self._judge_rate(len(datagrams))
        if self._closing:
            return
        if len(datagrams) == limit:
            if not self._gathering:
                self._noticed = (time.time(), time.monotonic())
            self._timer = self._loop.call_soon(self._read)
        else:
            self._noticed = None
            self._watch()

    def _judge_rate(self, count: int) -> None:
        """Gather only while datagrams arrive below GATHER_BELOW_PER_S, for as long as
        GATHER_DATAGRAMS take to arrive (at most `gather_s`)."""
        if not self._gather_s:
            return
        self._window_count += count
        elapsed_s = self._loop.time() - self._window_start
        if elapsed_s >= RATE_WINDOW_S:
            per_s = self._window_count / elapsed_s
            self._gathering = per_s < GATHER_BELOW_PER_S
            self._wait_s = wait_s(self._gather_s, per_s)
            self._window_start += elapsed_s
            self._window_count = 0

    # -- sending -----------------------------------------------------------------------
    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        if self._closing:
            return
        if not self._unsent:
            try:
                self._sock.sendto(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                self._loop.add_writer(self._fd, self._write_unsent)
            except OSError as e:
                self._sink.error_received(e)
                return
        self._unsent.append((bytes(data), addr))

    def _write_unsent(self) -> None:
        while self._unsent:
            data, addr = self._unsent[0]
            try:
                self._sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._sink.error_received(e)
            self._unsent.popleft()
        self._loop.remove_writer(self._fd)

    def get_write_buffer_size(self) -> int:
        return sum(len(data) for data, _ in self._unsent)

    # -- the end -----------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._unwatch()
        if self._timer is not None:
            self._timer.cancel()
        if self._unsent:
            self._loop.remove_writer(self._fd)
            self._unsent.clear()
        self._loop.call_soon(self._closed)

    def abort(self) -> None:
        self.close()

    def _closed(self) -> None:
        try:
            self._sink.connection_lost(None)
        finally:
            self._sock.close()


def serve_udp(sock: socket.socket, sink: BatchSink, gather_s: float,
              together: Together | None = None) -> GatheringUdpTransport:
    """Start reading `sock` (bound, non-blocking) into `sink` on the running loop."""
    transport = GatheringUdpTransport(asyncio.get_running_loop(), sock, sink, gather_s,
                                      together)
    transport.start()
    return transport


def wait_s(gather_s: float, per_s: float) -> float:
    """The wait before reading at `per_s` datagrams a second: GATHER_DATAGRAMS' worth, at
    most `gather_s`."""
    return min(gather_s, GATHER_DATAGRAMS / per_s) if per_s > 0 else gather_s


def gather_s(commit_linger_s: float) -> float:
    """The wait before reading a readable socket, for a spool lingering `commit_linger_s`."""
    return min(GATHER_MAX_S, commit_linger_s)
