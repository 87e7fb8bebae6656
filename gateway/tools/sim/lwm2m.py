"""An LwM2M 1.1 device for the simulator: registers in queue mode (b=UQ), Sends each report
(SenML CBOR or JSON on `/dp`) from the address it registered with, and, being a CoAP
server on the same socket, answers the gateway's Read, Write, Write-Attributes, Execute,
Discover and Observe with piggybacked ACKs while it is awake.

A device keeps one source port across its wakes, as a carrier NAT keeps a mapping while it
is used: it listens `listen_s` (the gateway's `lwm2m.awake_s`) after its last datagram,
a report due meanwhile leaves on the same socket, and then it sleeps (no socket). Once it
slept past the NAT's idle timeout, or its NAT rebound during a retransmission, it comes
back from a new port and Updates before it Sends, as NB-IoT clients do. A Send refused
with 4.03/4.04 (the gateway knows no registration at that address) is followed by an
Update (a Register if that is refused) and the same Send again.

The reporting interval is the LwM2M Server object's Default Maximum Period, /1/0/3 (pmax:
the longest the device may go without reporting); a Write of it sets the interval of the
reports after it. It never blocks the loop and never outlives the run: `close()` closes
its socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.ingest.coap import numbers as C
from gateway.ingest.coap import wire
from gateway.ingest.lwm2m import content
from gateway.ingest.lwm2m.paths import LwM2mPath, PathError, parse_path, render_path
from gateway.tools.sim.exchange import Link, Outcome
from gateway.tools.sim.payloads import _cbor, _cbor_array_head
from gateway.tools.sim.retransmit import RetransmissionTimer
from gateway.tools.sim.retransmit import service_unavailable_wait_s as max_age_wait_s

if TYPE_CHECKING:
    from gateway.tools.sim.fleet import SimDevice
    from gateway.tools.sim.ledger import Ledger

LIFETIME_S = 86_400  # registered for a day, as a real module
VERSION = "1.1"
BINDING = "UQ"  # queue mode: the gateway holds its requests until the device speaks
INTERVAL_PATH: LwM2mPath = (1, 0, 3)  # Server object, Default Maximum Period (pmax)
LIFETIME_PATH: LwM2mPath = (1, 0, 1)
PMIN_PATH: LwM2mPath = (1, 0, 2)
REBOOT_PATH: LwM2mPath = (3, 0, 4)  # Device object, Reboot: the device registers anew
UPDATE_TRIGGER_PATH: LwM2mPath = (1, 0, 8)  # Server object, Registration Update Trigger
WRITABLE = frozenset({LIFETIME_PATH, PMIN_PATH, INTERVAL_PATH})
EXECUTABLE = frozenset({REBOOT_PATH, UPDATE_TRIGGER_PATH})
SEND_FORMATS = (content.SENML_CBOR, content.SENML_JSON)
# A Send refused as from an unknown address is sent again after an Update this often (a
# NAT may rebind again during the Update or the Send); then the refusal stands.
MAX_SEND_REFUSALS = 3
_SERVED_KEPT = 8  # responses kept by message ID: a retransmitted request gets the same one


class Step:
    REGISTER = "register"
    UPDATE = "update"
    SEND = "send"


@dataclass(frozen=True, slots=True)
class Lwm2mType:
    """What the devices of one type share: which resource holds which field, their object
    links, the encoded options of a Send."""

    paths: dict[str, LwM2mPath]  # field -> resource
    links: bytes  # </1/0>,</3/0>,</3303/0>,...
    names_cbor: dict[str, bytes]  # field -> the SenML CBOR `n` label and name, and the `v` label
    names_json: dict[str, str]

    @classmethod
    def of(cls, fields: Mapping[str, str]) -> Lwm2mType:
        paths = {name: parse_path(path) for name, path in fields.items()}
        instances = sorted({(1, 0), (3, 0), *(p[:2] for p in paths.values())})
        links = ",".join(f"<{render_path(i)}>" for i in instances).encode()
        # SenML names below the base name "/": "3303/0/5700".
        names = {f: render_path(p)[1:] for f, p in paths.items()}
        return cls(paths, links,
                   {f: _cbor(0) + _cbor(n) + _cbor(2) for f, n in names.items()},
                   {f: '"n":' + json.dumps(n) + ',"v":' for f, n in names.items()})


def encode_send(kind: Lwm2mType, content_format: int, time_ms: int,
                values: Mapping[str, float]) -> bytes:
    """A Send's SenML pack: base name "/", base time the reading's (ms precision: the
    gateway makes round(bt * 1000) the reading's seq), one record a mapped field."""
    bt = time_ms / 1000.0
    if content_format == content.SENML_CBOR:
        chunks = [_cbor_array_head(len(values))]
        first = True
        for name, value in values.items():
            label = kind.names_cbor[name]
            if first:
                chunks += b"\xa4", _BASE_CBOR, _cbor(bt), label, _cbor(value)
                first = False
            else:
                chunks += b"\xa2", label, _cbor(value)
        return b"".join(chunks)
    parts: list[str] = []
    for name, value in values.items():
        head = '{"bn":"/","bt":' + float.__repr__(bt) + "," if not parts else "{"
        parts.append(head + kind.names_json[name] + float.__repr__(value) + "}")
    return ("[" + ",".join(parts) + "]").encode()


_BASE_CBOR = _cbor(-2) + _cbor("/") + _cbor(-3)  # bn: "/", bt: (the time follows)


def _request_options(path: tuple[str, ...], queries: tuple[str, ...] = (),
                     content_format: int | None = None) -> list[tuple[int, bytes]]:
    options = [(C.URI_PATH, p.encode()) for p in path]
    if content_format is not None:
        options.append((C.CONTENT_FORMAT, wire.uint_value(content_format)))
    options += [(C.URI_QUERY, q.encode()) for q in queries]
    return options


class Lwm2mDevice:
    """One simulated LwM2M device's radio side: its socket while awake, its registration,
    its resources. `report()` delivers one reading (Register or Update first if needed);
    `on_done(self)` is called once per report with the outcome, as an Exchange's."""

    __slots__ = ("_generation", "_handle", "_last_activity", "_last_out", "_listen_handle",
                 "_on_done", "_on_sent", "_on_the_way", "_payload", "_pending", "_port",
                 "_refusals", "_req", "_served", "_sock", "_timer", "code",
                 "content_format", "device", "finished_at", "kind", "ledger", "link", "listen_s",
                 "location", "max_age_s", "needs_update", "on_interval", "outcome", "readings", "rebinds",
                 "reply_payload", "retransmissions", "stale_replies", "started_at",
                 "transmissions")

    def __init__(self, device: SimDevice, kind: Lwm2mType, content_format: int, link: Link,
                 ledger: Ledger, listen_s: float) -> None:
        self.device = device
        self.kind = kind
        self.content_format = content_format
        self.link = link
        self.ledger = ledger
        self.listen_s = listen_s
        # Called when a Write changed the reporting interval (the fleet moves its next report).
        self.on_interval: Callable[[], None] | None = None
        self.location: str | None = None  # "rd/{id}" once registered
        self.needs_update = False
        self.readings: dict[str, float] = {}  # the last report's, for a Read
        self._sock: socket.socket | None = None
        self._port = 0  # the source port it keeps between wakes (0: none yet)
        self._generation = 0  # of the socket: datagrams to an older one are lost
        self._last_out = -math.inf  # when its last datagram left (loop time): the NAT's idle clock
        self._last_activity = 0.0  # the listen window counts from here
        self._listen_handle: asyncio.TimerHandle | None = None
        self._served: dict[int, bytes] = {}
        self._on_the_way: list[float] = []
        self._pending = 0  # datagrams of ours waiting out their uplink latency
        self._req: tuple[str, int, bytes, bytes] | None = None  # step, mid, token, datagram
        self._timer: RetransmissionTimer | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._payload = b""
        self._refusals = 0  # Sends of this report refused as from an unknown address
        self._on_sent: Callable[[], None] | None = None
        self._on_done: Callable[[Lwm2mDevice], None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.outcome: Outcome | None = None
        self.code = 0
        self.max_age_s = 0.0
        self.started_at = 0.0
        self.finished_at = 0.0
        self.transmissions = 0
        self.retransmissions = 0
        self.rebinds = 0
        self.stale_replies = 0
        self.reply_payload = b""  # LwM2M commands come as requests, never in a reply

    @property
    def done(self) -> bool:
        return self.outcome is not None

    @property
    def source_port(self) -> int | None:
        return None if self._sock is None else int(self._sock.getsockname()[1])

    # -- a report ------------------------------------------------------------------------
    def report(self, payload: bytes, on_sent: Callable[[], None],
               on_done: Callable[[Lwm2mDevice], None]) -> None:
        self._reset()
        self._payload, self._on_sent, self._on_done = payload, on_sent, on_done
        self._refusals = 0
        link = self.link
        now = link.loop.time()
        self.started_at = now - link.radio.latency_s(self.device.coverage)
        with contextlib.suppress(OSError):
            self._wake_socket(now)
        step = (Step.REGISTER if self.location is None else Step.UPDATE if self.needs_update
                else Step.SEND)
        self._request(step, self.started_at, first=True)

    def _wake_socket(self, now: float) -> None:
        """The socket it speaks from: the one it listens on, or the port it kept, or, once
        its NAT mapping is gone, a new port (the gateway must be told: Update)."""
        expired = now - self._last_out > self.link.nat_idle_timeout_s
        if self._sock is not None and not expired:
            return
        port = 0 if expired else self._port
        if self._sock is not None:
            self._close_socket()
        try:
            self._open_socket(port)
        except OSError:
            if port == 0:
                raise
            self._open_socket(0)  # the port is taken meanwhile: a new one
        if self.location is not None and self.source_port != self._port:
            self.needs_update = True
        self._port = self.source_port or 0

    def _open_socket(self, port: int) -> None:
        link = self.link
        sock = link.open_socket(self.device.source_ip, port)
        self._generation += 1
        link.receiver.watch(sock, functools.partial(self._received, self._generation))
        self._sock = sock

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            self.link.receiver.close(sock)
        self._served.clear()

    def _request(self, step: str, at: float, *, first: bool = False) -> None:
        """Send the step's CON request as of `at` (its first datagram leaves now when
        `first`, else one uplink latency after `at`)."""
        device = self.device
        device.mid = (device.mid + 1) & 0xFFFF
        token = self.link.rng.getrandbits(32).to_bytes(4, "big")
        if step == Step.REGISTER:
            options = _request_options(
                ("rd",), (f"ep={device.device_id}", f"lt={LIFETIME_S}", f"lwm2m={VERSION}",
                          f"b={BINDING}"), content.LINK)
            payload = self.kind.links
        elif step == Step.UPDATE:
            assert self.location is not None
            options, payload = _request_options(tuple(self.location.split("/"))), b""
        else:
            options = _request_options(("dp",), (), self.content_format)
            payload = self._payload
        data = wire.encode(wire.Message(C.CON, C.POST, device.mid, token, options, payload))
        self._req = (step, device.mid, token, data)
        self._timer = RetransmissionTimer(at, self.link.rng.random(), self.link.params)
        self.transmissions += 1
        if step == Step.SEND and self._on_sent is not None:
            on_sent, self._on_sent = self._on_sent, None
            on_sent()
        if first:
            self._put(data, now=True)
        elif not self.link.radio.uplink_lost():
            self._pending += 1
            self.link.loop.call_at(at + self.link.radio.latency_s(device.coverage),
                                   self._put_later, self._generation, data)
        self._arm()

    def _arm(self) -> None:
        assert self._timer is not None
        self._handle = self.link.loop.call_at(self._timer.deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._handle = None
        if self.done or self._req is None or self._timer is None:
            return
        link = self.link
        now = link.loop.time()
        if not self._timer.on_timeout(now):
            self._end(Outcome.TIMEOUT, now)
            return
        self.retransmissions += 1
        self.transmissions += 1
        p = link.nat_rebind_probability
        if self._sock is None or (p > 0 and link.rng.random() < p):
            # The carrier NAT gave it a new public port: the gateway must hear an Update.
            with contextlib.suppress(OSError):
                if self._sock is not None:
                    self.rebinds += 1
                    self._close_socket()
                self._open_socket(0)
                self._port = self.source_port or 0
                if self.location is not None:
                    self.needs_update = True
        if not link.radio.uplink_lost():
            self._pending += 1
            link.loop.call_later(link.radio.latency_s(self.device.coverage), self._put_later,
                                 self._generation, self._req[3])
        self._arm()

    def _put(self, data: bytes, *, now: bool = False) -> None:
        sock = self._sock
        if sock is None or (now and self.link.radio.uplink_lost()):
            return
        self._last_out = self.link.loop.time()
        with contextlib.suppress(OSError):  # a full buffer or ICMP unreachable: lost
            sock.send(data)

    def _put_later(self, generation: int, data: bytes) -> None:
        self._pending -= 1
        if generation == self._generation:
            self._put(data)

    # -- receiving -----------------------------------------------------------------------
    def _received(self, generation: int, data: bytes) -> None:
        link = self.link
        if link.radio.downlink_lost():
            return
        arrives_at = link.loop.time() + link.radio.latency_s(self.device.coverage)
        timer = self._timer
        if (not self._on_the_way or arrives_at < min(self._on_the_way)) and (
                self._req is None or timer is None or arrives_at < timer.deadline):
            self._deliver(data, generation, arrives_at)  # before anything else can happen
        else:
            self._on_the_way.append(arrives_at)
            link.loop.call_at(arrives_at, self._arrive, data, generation, arrives_at)

    def _arrive(self, data: bytes, generation: int, at: float) -> None:
        self._on_the_way.remove(at)
        self._deliver(data, generation, at)

    def _deliver(self, data: bytes, generation: int, at: float) -> None:
        if generation != self._generation or self._sock is None:
            return
        try:
            msg = wire.decode(data)
        except wire.CoapFormatError:
            return
        self._last_activity = max(self._last_activity, at)
        if C.EMPTY < msg.code < 32 and msg.mtype in (C.CON, C.NON):
            self._serve(msg, at)
            return
        req = self._req
        if req is None or self.done:
            return
        step, mid, token, _ = req
        if msg.mtype in (C.ACK, C.RST) and msg.mid != mid:
            return
        if msg.mtype == C.RST:
            self._end(Outcome.RESET, at)
            return
        if msg.code == C.EMPTY:
            return  # a separate response would follow; the gateway piggybacks
        if msg.token != token:
            self.stale_replies += 1
            return
        if msg.mtype == C.CON:
            self._respond(wire.encode(wire.Message(C.ACK, C.EMPTY, msg.mid)), at)
        self._answered(step, msg, at)

    def _answered(self, step: str, msg: wire.Message, at: float) -> None:
        code = msg.code
        self._req = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        ledger = self.ledger
        if code in (C.SERVICE_UNAVAILABLE, C.TOO_MANY_REQUESTS):
            max_age = msg.option(C.MAX_AGE)
            self.max_age_s = max_age_wait_s(None if max_age is None else wire.uint_of(max_age))
            self._end(Outcome.UNAVAILABLE, at, code)
        elif step == Step.REGISTER:
            if code == C.CREATED:
                ledger.lwm2m_registers += 1
                self.location = "/".join(v.decode() for n, v in msg.options
                                         if n == C.LOCATION_PATH) or None
                self.needs_update = False
                self._request(Step.SEND, at)
            else:
                ledger.lwm2m_refused[f"register {C.code_str(code)}"] += 1
                self._end(Outcome.REJECTED, at, code)
        elif step == Step.UPDATE:
            if code == C.CHANGED:
                ledger.lwm2m_updates += 1
                self.needs_update = False
                self._request(Step.SEND, at)
            elif code == C.NOT_FOUND:  # the gateway forgot it (lifetime): register anew
                self.location = None
                self._request(Step.REGISTER, at)
            else:
                ledger.lwm2m_refused[f"update {C.code_str(code)}"] += 1
                self._end(Outcome.REJECTED, at, code)
        elif code >> 5 == 2:
            self._end(Outcome.ACKED, at, code)
        elif code in (C.FORBIDDEN, C.NOT_FOUND) and self._refusals < MAX_SEND_REFUSALS:
            # Not registered at this address (a NAT rebind it did not notice): Update, and
            # the same reading again (the gateway's (device, seq) dedup keeps it once).
            ledger.lwm2m_refused[f"send {C.code_str(code)}"] += 1
            self._refusals += 1
            self._request(Step.REGISTER if self.location is None else Step.UPDATE, at)
        else:
            self._end(Outcome.REJECTED, at, code)

    # -- the end of a report, and of listening --------------------------------------------
    def finish(self, outcome: Outcome, at: float | None = None) -> None:
        """End the report in flight with `outcome` (the run is over: ABORTED)."""
        if not self.done and self._on_done is not None:
            self._end(outcome, self.link.loop.time() if at is None else at)

    def _end(self, outcome: Outcome, at: float, code: int = 0) -> None:
        if self.done:
            return
        self.outcome, self.code, self.finished_at = outcome, code, at
        self._req = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if outcome is Outcome.ACKED:
            self._last_activity = max(self._last_activity, at)
            self._listen()
        else:
            self._close_socket()  # back to sleep; the next wake tells which port it has
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done(self)

    def _listen(self) -> None:
        if self._listen_handle is None and self._sock is not None:
            self._listen_handle = self.link.loop.call_at(self._last_activity + self.listen_s,
                                                         self._listen_over)

    def _listen_over(self) -> None:
        self._listen_handle = None
        now = self.link.loop.time()
        if self._req is not None or self._pending or self._on_the_way or (
                now < self._last_activity + self.listen_s):
            if self._sock is not None:
                self._listen_handle = self.link.loop.call_at(
                    max(now, self._last_activity) + self.listen_s, self._listen_over)
            return
        self._close_socket()  # asleep (PSM) until the next report

    def close(self) -> None:
        """The run is over."""
        if self._listen_handle is not None:
            self._listen_handle.cancel()
            self._listen_handle = None
        self._close_socket()

    # -- the gateway's requests: the device as a CoAP server ----------------------------
    def _serve(self, msg: wire.Message, at: float) -> None:
        if msg.mtype == C.CON:
            cached = self._served.get(msg.mid)
            if cached is not None:  # a retransmission: the same response again
                self._respond(cached, at)
                return
        op, code, options, payload = self._handle_request(msg)
        self.ledger.lwm2m_requests[f"{op} {C.code_str(code)}"] += 1
        if msg.mtype == C.CON:
            data = wire.encode(wire.Message(C.ACK, code, msg.mid, msg.token, options, payload))
            if len(self._served) >= _SERVED_KEPT:
                del self._served[next(iter(self._served))]
            self._served[msg.mid] = data
        else:
            self.device.mid = (self.device.mid + 1) & 0xFFFF
            data = wire.encode(wire.Message(C.NON, code, self.device.mid, msg.token, options,
                                            payload))
        self._respond(data, at)
        self._listen()

    def _respond(self, data: bytes, at: float) -> None:
        """A datagram of ours, leaving at `at` (the request reached us then)."""
        link = self.link
        if link.radio.uplink_lost():
            return
        self._pending += 1
        link.loop.call_at(at + link.radio.latency_s(self.device.coverage), self._put_later,
                          self._generation, data)
        self._last_activity = max(self._last_activity, at)

    def _handle_request(self, msg: wire.Message) -> tuple[str, int, list[tuple[int, bytes]], bytes]:
        """(op, code, options, payload) of the response."""
        try:
            path = tuple(int(v) for n, v in msg.options if n == C.URI_PATH)
        except ValueError:
            return "unknown", C.NOT_FOUND, [], b""
        if msg.code == C.GET:
            accept = msg.option(C.ACCEPT)
            if accept is not None and wire.uint_of(accept) == content.LINK:
                return ("discover", C.CONTENT,
                        [(C.CONTENT_FORMAT, wire.uint_value(content.LINK))], self._links(path))
            # An Observe is answered as a Read without the Observe option (RFC 7641 3.2:
            # not added to the observers): this device Sends its readings instead.
            op = "observe" if msg.option(C.OBSERVE) is not None else "read"
            return (op, *self._read(path))
        if msg.code == C.PUT and not msg.payload and any(n == C.URI_QUERY for n, _ in msg.options):
            known = self._resources(path)
            return "write-attr", C.CHANGED if known else C.NOT_FOUND, [], b""
        if msg.code == C.POST and len(path) == 3:
            return "execute", self._execute(path), [], b""
        if msg.code in (C.PUT, C.POST):
            return "write", self._write(msg, path), [], b""
        return "unknown", C.METHOD_NOT_ALLOWED, [], b""

    def _resources(self, under: LwM2mPath) -> dict[LwM2mPath, object]:
        device = self.device
        values: dict[LwM2mPath, object] = {
            (1, 0, 0): 1, LIFETIME_PATH: LIFETIME_S, PMIN_PATH: 1,
            INTERVAL_PATH: round(device.interval_s), (1, 0, 7): BINDING,
            (3, 0, 0): "nbiot-gateway simulator", (3, 0, 1): device.device_type,
            (3, 0, 2): device.device_id, (3, 0, 3): "sim-1", (3, 0, 9): 87,
        }
        for name, path in self.kind.paths.items():
            if name in self.readings:
                values[path] = self.readings[name]
        return {p: v for p, v in values.items() if p[:len(under)] == under}

    def _read(self, path: LwM2mPath) -> tuple[int, list[tuple[int, bytes]], bytes]:
        found = self._resources(path)
        if not found:
            return C.NOT_FOUND, [], b""
        if len(path) == 3 and len(found) == 1:
            (value,) = found.values()
            return (C.CONTENT, [(C.CONTENT_FORMAT, wire.uint_value(content.TEXT))],
                    str(value).encode())
        records: list[dict[str, object]] = []
        for p, value in sorted(found.items()):
            record: dict[str, object] = {"n": render_path(p)}
            record["vs" if isinstance(value, str) else "v"] = value
            records.append(record)
        return (C.CONTENT, [(C.CONTENT_FORMAT, wire.uint_value(content.SENML_JSON))],
                json.dumps(records, separators=(",", ":")).encode())

    def _links(self, path: LwM2mPath) -> bytes:
        found = self._resources(path)
        if not found:
            return b""
        return ",".join([f"<{render_path(path)}>"]
                        + [f"<{render_path(p)}>" for p in sorted(found) if p != path]).encode()

    def _write(self, msg: wire.Message, path: LwM2mPath) -> int:
        cf_option = msg.option(C.CONTENT_FORMAT)
        cf = wire.uint_of(cf_option) if cf_option is not None else content.TEXT
        try:
            readings = content.decode(msg.payload, cf, path, 0.0)
        except (content.ContentError, PathError):
            return C.BAD_REQUEST
        if not readings:
            return C.BAD_REQUEST
        if any(r.path not in WRITABLE for r in readings):
            known = self._resources(path)
            return C.METHOD_NOT_ALLOWED if known else C.NOT_FOUND
        for reading in readings:
            try:
                value = float(content.as_kind(reading.value, "float"))
            except (content.ContentError, TypeError, ValueError):
                return C.BAD_REQUEST
            if not math.isfinite(value) or value <= 0:
                return C.BAD_REQUEST
            if reading.path == INTERVAL_PATH:
                self.device.interval_s = value  # the reports after this one
                self.ledger.lwm2m_interval_writes += 1
                if self.on_interval is not None:
                    self.on_interval()
        return C.CHANGED

    def _execute(self, path: LwM2mPath) -> int:
        if path == REBOOT_PATH:
            self.location = None  # it comes back with a Register
            return C.CHANGED
        if path == UPDATE_TRIGGER_PATH:
            self.needs_update = True
            return C.CHANGED
        return C.METHOD_NOT_ALLOWED if self._resources(path) else C.NOT_FOUND
