"""One confirmable CoAP POST of one report, from a UDP socket of its own for this wake.

Drives the RFC 7252 retransmission timer, applies the radio model (latency, loss both
ways, NAT rebinding = a new source port), matches the reply by message ID and token, and
calls back once with the outcome. It never outlives its exchange: the socket is closed
when it is done, so a device holds a file descriptor only while it is awake.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from urllib.parse import quote

from gateway.coap import numbers as C
from gateway.coap import wire
from gateway.sim.radio import Coverage, NatMapping, Radio
from gateway.sim.retransmit import RetransmissionTimer, TransmissionParameters
from gateway.sim.retransmit import service_unavailable_wait_s as max_age_wait_s

RECV_BYTES = 2048


class Outcome(Enum):
    ACKED = "acked"  # a 2.xx response
    REJECTED = "rejected"  # a 4.xx or 5.xx other than 5.03
    UNAVAILABLE = "unavailable"  # 5.03 or 4.29: wait Max-Age, then retry the same report
    TIMEOUT = "timeout"  # no response after MAX_RETRANSMIT retransmissions
    RESET = "reset"  # the server answered RST
    ABORTED = "aborted"  # the run ended first


@dataclass(frozen=True, slots=True)
class Link:
    """What every exchange of a run shares: where to send, and the radio and timer rules."""

    loop: asyncio.AbstractEventLoop
    target: tuple[str, int]
    family: socket.AddressFamily
    radio: Radio
    rng: random.Random
    params: TransmissionParameters
    nat_idle_timeout_s: float
    nat_rebind_probability: float


def build_request(mid: int, token: bytes, device_id: str, device_token: str, content_format: int,
                  payload: bytes) -> bytes:
    """The CON POST coap://host/up/{device_id}?k={token} with the report as payload."""
    options = [
        (C.URI_PATH, b"up"),
        (C.URI_PATH, device_id.encode()),
        (C.CONTENT_FORMAT, wire.uint_value(content_format)),
        (C.URI_QUERY, b"k=" + quote(device_token, safe="").encode()),
    ]
    return wire.encode(wire.Message(C.CON, C.POST, mid, token, options, payload))


class Exchange:
    """Start with `start()`; `on_done(exchange)` is called exactly once."""

    __slots__ = ("_handle", "_request", "_sock", "_source_ip", "code", "coverage", "link",
                 "max_age_s", "mid", "nat", "on_done", "outcome", "rebinds", "reply_payload",
                 "retransmissions",
                 "stale_replies", "started_at", "timer", "token", "transmissions")

    def __init__(
        self,
        link: Link,
        *,
        source_ip: str,
        coverage: Coverage,
        mid: int,
        token: bytes,
        request: bytes,
        on_done: Callable[[Exchange], None],
    ) -> None:
        self.link = link
        self._source_ip = source_ip
        self.coverage = coverage
        self.mid = mid
        self.token = token
        self._request = request
        self.on_done = on_done
        self._sock: socket.socket | None = None
        self._handle: asyncio.TimerHandle | None = None
        self.nat: NatMapping | None = None
        self.timer: RetransmissionTimer | None = None
        self.outcome: Outcome | None = None
        self.code = 0
        self.reply_payload = b""  # of the 2.xx: a downlink command, if the gateway had one
        self.max_age_s = 0.0
        self.started_at = 0.0
        self.transmissions = 0
        self.retransmissions = 0
        self.rebinds = 0
        self.stale_replies = 0

    @property
    def done(self) -> bool:
        return self.outcome is not None

    @property
    def source_port(self) -> int | None:
        """The source port the gateway sees now (None when no socket is open)."""
        if self._sock is None:
            return None
        port: int = self._sock.getsockname()[1]
        return port

    # -- sending ---------------------------------------------------------------------
    def start(self) -> None:
        link = self.link
        now = link.loop.time()
        self.started_at = now
        self.nat = NatMapping(link.loop.time, link.rng, idle_timeout_s=link.nat_idle_timeout_s,
                              rebind_probability=link.nat_rebind_probability)
        self.timer = RetransmissionTimer(now, link.rng.random(), link.params)
        try:
            self._open_socket()
        except OSError:
            # No descriptor or port left: the radio never got the message out.
            self._arm()
            return
        self._transmit()
        self._arm()

    def _open_socket(self) -> None:
        sock = socket.socket(self.link.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((self._source_ip, 0))
            sock.connect(self.link.target)
        except OSError:
            sock.close()
            raise
        assert self.nat is not None
        self.link.loop.add_reader(sock.fileno(), self._readable, sock, self.nat.generation)
        self._sock = sock

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            self.link.loop.remove_reader(sock.fileno())
            sock.close()

    def _transmit(self) -> None:
        self.transmissions += 1
        link = self.link
        if self._sock is None or link.radio.uplink_lost():
            return
        link.loop.call_later(link.radio.latency_s(self.coverage), _send, self._sock, self._request)

    def _arm(self) -> None:
        assert self.timer is not None
        self._handle = self.link.loop.call_at(self.timer.deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._handle = None
        assert self.timer is not None and self.nat is not None
        if self.done:
            return
        if not self.timer.on_timeout(self.link.loop.time()):
            self.finish(Outcome.TIMEOUT)
            return
        self.retransmissions += 1
        if self.nat.outbound() or self._sock is None:
            # The carrier NAT gave this device a new public port: a new socket is a new
            # source endpoint (opened before the old one closes, so the port differs), and
            # replies to the old one never arrive.
            old = self._sock
            if old is not None:
                self.rebinds += 1
            with contextlib.suppress(OSError):
                self._open_socket()
            if old is not None and old is not self._sock:
                self.link.loop.remove_reader(old.fileno())
                old.close()
            elif old is not None:  # no new socket: the device cannot send at all now
                self._close_socket()
        self._transmit()
        self._arm()

    # -- receiving -------------------------------------------------------------------
    def _readable(self, sock: socket.socket, generation: int) -> None:
        link = self.link
        while True:
            try:
                data = sock.recv(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP port unreachable: the gateway is not there (yet)
                return
            if link.radio.downlink_lost():
                continue
            link.loop.call_later(link.radio.latency_s(self.coverage), self._deliver, data, generation)

    def _deliver(self, data: bytes, generation: int) -> None:
        """A datagram reaches the device (after the downlink latency)."""
        if self.done or self.nat is None or not self.nat.inbound_allowed(generation):
            return
        try:
            msg = wire.decode(data)
        except wire.CoapFormatError:
            return
        if msg.mtype == C.RST:
            if msg.mid == self.mid:
                self.finish(Outcome.RESET)
            return
        if msg.mtype == C.ACK and msg.mid != self.mid:
            return
        if msg.code == C.EMPTY:
            return  # an empty ACK: a separate response would follow; this gateway piggybacks
        if msg.token != self.token:
            self.stale_replies += 1  # for another exchange that used this endpoint and MID
            return
        if msg.mtype == C.CON:  # a separate response: acknowledge it
            self._send_now(wire.encode(wire.Message(C.ACK, C.EMPTY, msg.mid)))
        self.code = msg.code
        if msg.code >> 5 == 2:
            self.reply_payload = msg.payload
            self.finish(Outcome.ACKED)
        elif msg.code == C.SERVICE_UNAVAILABLE or msg.code == C.TOO_MANY_REQUESTS:
            max_age = msg.option(C.MAX_AGE)
            self.max_age_s = max_age_wait_s(None if max_age is None else wire.uint_of(max_age))
            self.finish(Outcome.UNAVAILABLE)
        else:
            self.finish(Outcome.REJECTED)

    def _send_now(self, data: bytes) -> None:
        if self._sock is not None:
            _send(self._sock, data)

    # -- the end -----------------------------------------------------------------------
    def finish(self, outcome: Outcome) -> None:
        if self.done:
            return
        self.outcome = outcome
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._close_socket()
        self.on_done(self)


def _send(sock: socket.socket, data: bytes) -> None:
    """Put a datagram on the wire, unless its socket was closed while it was in the air."""
    if sock.fileno() == -1:
        return
    # A full socket buffer or ICMP unreachable: the datagram is lost, as on a radio.
    with contextlib.suppress(OSError):
        sock.send(data)
