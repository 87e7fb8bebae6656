"""One confirmable CoAP POST of one report, from a source endpoint of its own for this wake
(gateway/tools/sim/endpoints.py).

Drives the RFC 7252 retransmission timer, applies the radio model (latency, loss both
ways, NAT rebinding = a new source port), matches the reply by message ID and token, and
calls back once with the outcome. It never outlives its exchange: the endpoint is closed
when it is done, so a sleeping device holds none.

Two radio delays cost no timer (one each per report, ~7 µs; docs/decisions.md): the
first datagram leaves at once and the device is taken to have sent it one uplink
latency earlier (`started_at`), and a reply that reaches the device before its
retransmission timer would fire (and before any datagram still on its way down) is
handled when it is received, booked at the time it reaches the device (`finished_at`):
nothing can happen to the exchange in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from urllib.parse import quote

from gateway.ingest.coap import numbers as C
from gateway.ingest.coap import wire
from gateway.tools.sim.endpoints import Endpoint, OwnSocket, Received, Receiver, SharedPorts
from gateway.tools.sim.radio import Coverage, NatMapping, Radio
from gateway.tools.sim.retransmit import RetransmissionTimer, TransmissionParameters
from gateway.tools.sim.retransmit import service_unavailable_wait_s as max_age_wait_s


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
    receiver: Receiver = field(default_factory=Receiver)
    shared_ports: SharedPorts | None = None  # with every device on an address of its own

    def open_endpoint(self, source_ip: str, received: Received) -> Endpoint:
        """An endpoint from `source_ip` whose replies go to `received`, on another port
        than any endpoint of `source_ip` still open; OSError when there is none to have."""
        if self.shared_ports is not None:
            return self.shared_ports.open(source_ip, received)
        return OwnSocket(self.open_socket(source_ip), self.receiver, received)

    def open_socket(self, source_ip: str, port: int = 0) -> socket.socket:
        """A device's non-blocking UDP socket from (`source_ip`, `port`) to the target;
        OSError (closed again) when it cannot have one."""
        sock = socket.socket(self.family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            sock.bind((source_ip, port))
            sock.connect(self.target)
        except OSError:
            sock.close()
            raise
        return sock


def build_request(mid: int, token: bytes, device_id: str, device_token: str, content_format: int,
                  payload: bytes) -> bytes:
    """The CON POST coap://host/up/{device_id}?k={token} with the report as payload."""
    return encode_request(mid, token, request_options(device_id, device_token, content_format),
                          payload)


def request_options(device_id: str, device_token: str, content_format: int) -> bytes:
    """The encoded options of a device's uplinks: the same for all of them, so a device
    encodes them once (~2.5 µs a report less than encoding the whole message each time)."""
    options = [
        (C.URI_PATH, b"up"),
        (C.URI_PATH, device_id.encode()),
        (C.CONTENT_FORMAT, wire.uint_value(content_format)),
        (C.URI_QUERY, b"k=" + quote(device_token, safe="").encode()),
    ]
    return wire.encode(wire.Message(C.CON, C.POST, 0, b"", options))[4:]


def encode_request(mid: int, token: bytes, options: bytes, payload: bytes) -> bytes:
    """`wire.encode` of the CON POST with these pre-encoded options (tests compare them)."""
    header = bytes((0x40 | (C.CON << 4) | len(token), C.POST, mid >> 8, mid & 0xFF))
    return b"".join((header, token, options, b"\xff", payload)) if payload else (
        header + token + options)


class Exchange:
    """Start with `start()`; `on_done(exchange)` is called exactly once."""

    __slots__ = ("_endpoint", "_handle", "_on_the_way", "_request", "_source_ip", "code", "coverage",
                 "finished_at", "link", "max_age_s", "mid", "nat", "on_done", "outcome", "rebinds",
                 "reply_payload", "retransmissions", "stale_replies", "started_at", "timer",
                 "token", "transmissions")

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
        self._endpoint: Endpoint | None = None
        self._handle: asyncio.TimerHandle | None = None
        self.nat: NatMapping | None = None
        self.timer: RetransmissionTimer | None = None
        self.outcome: Outcome | None = None
        self.code = 0
        self.reply_payload = b""  # of the 2.xx: a downlink command, if the gateway had one
        self.max_age_s = 0.0
        self.started_at = 0.0  # when the device sent its first datagram (loop time)
        self.finished_at = 0.0  # when the outcome reached the device (loop time)
        self._on_the_way: list[float] = []  # arrival times of datagrams still on their way down
        self.transmissions = 0
        self.retransmissions = 0
        self.rebinds = 0
        self.stale_replies = 0

    @property
    def done(self) -> bool:
        return self.outcome is not None

    @property
    def source_port(self) -> int | None:
        """The source port the gateway sees now (None when no endpoint is open)."""
        return None if self._endpoint is None else self._endpoint.port

    # -- sending ---------------------------------------------------------------------
    def start(self) -> None:
        link = self.link
        now = link.loop.time()
        # The first datagram leaves now, and the device sent it one uplink latency ago.
        self.started_at = now - link.radio.latency_s(self.coverage)
        self.timer = RetransmissionTimer(self.started_at, link.rng.random(), link.params)
        with contextlib.suppress(OSError):  # no descriptor or port left: nothing goes out
            self._open_endpoint()
        self.transmissions += 1
        if self._endpoint is not None and not link.radio.uplink_lost():
            self._endpoint.send(self._request)
        self._arm()

    def _open_endpoint(self) -> None:
        generation = 0 if self.nat is None else self.nat.generation
        self._endpoint = self.link.open_endpoint(self._source_ip,
                                                 functools.partial(self._received, generation))

    def _close_endpoint(self) -> None:
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            endpoint.close()

    def _transmit(self) -> None:
        self.transmissions += 1
        link = self.link
        if self._endpoint is None or link.radio.uplink_lost():
            return
        link.loop.call_later(link.radio.latency_s(self.coverage), self._endpoint.send,
                             self._request)

    def _arm(self) -> None:
        assert self.timer is not None
        self._handle = self.link.loop.call_at(self.timer.deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._handle = None
        assert self.timer is not None
        if self.done:
            return
        link = self.link
        if not self.timer.on_timeout(link.loop.time()):
            self.finish(Outcome.TIMEOUT)
            return
        self.retransmissions += 1
        if self.nat is None:  # made at the first retransmission: most exchanges need none
            self.nat = NatMapping(link.loop.time, link.rng, idle_timeout_s=link.nat_idle_timeout_s,
                                  rebind_probability=link.nat_rebind_probability,
                                  opened_at=self.started_at)
        if self.nat.outbound() or self._endpoint is None:
            # The carrier NAT gave this device a new public port: a new source endpoint
            # (opened before the old one closes, so the port differs), and replies to the
            # old one never arrive.
            old = self._endpoint
            if old is not None:
                self.rebinds += 1
            with contextlib.suppress(OSError):
                self._open_endpoint()
            if old is not None and old is not self._endpoint:
                old.close()
            elif old is not None:  # no new endpoint: the device cannot send at all now
                self._close_endpoint()
        self._transmit()
        self._arm()

    # -- receiving -------------------------------------------------------------------
    def _received(self, generation: int, data: bytes) -> None:
        link = self.link
        if link.radio.downlink_lost():
            return
        arrives_at = link.loop.time() + link.radio.latency_s(self.coverage)
        on_the_way = self._on_the_way
        if self.timer is not None and arrives_at < self.timer.deadline and (
                not on_the_way or arrives_at < min(on_the_way)):
            self._deliver(data, generation, arrives_at)  # before anything else can happen
        else:
            on_the_way.append(arrives_at)
            link.loop.call_at(arrives_at, self._arrive, data, generation, arrives_at)

    def _arrive(self, data: bytes, generation: int, at: float) -> None:
        self._on_the_way.remove(at)
        self._deliver(data, generation, at)

    def _deliver(self, data: bytes, generation: int, at: float) -> None:
        """A datagram reaches the device at `at` (after the downlink latency)."""
        if self.done:
            return
        if self.nat is None:
            if generation != 0 or at - self.started_at > self.link.nat_idle_timeout_s:
                return
        elif not self.nat.inbound_allowed(generation, at):
            return
        if data == wire.encode_ack(C.CHANGED, self.mid, self.token):
            # The reply nearly every report gets, a bare 2.04: no Message decoded for it.
            self.code = C.CHANGED
            self.finish(Outcome.ACKED, at)
            return
        try:
            msg = wire.decode(data)
        except wire.CoapFormatError:
            return
        if msg.mtype == C.RST:
            if msg.mid == self.mid:
                self.finish(Outcome.RESET, at)
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
            self.finish(Outcome.ACKED, at)
        elif msg.code == C.SERVICE_UNAVAILABLE or msg.code == C.TOO_MANY_REQUESTS:
            max_age = msg.option(C.MAX_AGE)
            self.max_age_s = max_age_wait_s(None if max_age is None else wire.uint_of(max_age))
            self.finish(Outcome.UNAVAILABLE, at)
        else:
            self.finish(Outcome.REJECTED, at)

    def _send_now(self, data: bytes) -> None:
        if self._endpoint is not None:
            self._endpoint.send(data)

    # -- the end -----------------------------------------------------------------------
    def finish(self, outcome: Outcome, at: float | None = None) -> None:
        """End the exchange with `outcome`, as of `at` (default: now)."""
        if self.done:
            return
        self.outcome = outcome
        self.finished_at = self.link.loop.time() if at is None else at
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._close_endpoint()
        self.on_done(self)

