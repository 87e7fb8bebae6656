"""The plain-CoAP (UDP) server side of uplinks: datagrams in, Uplinks out, Verdicts back.

RFC 7252 server behaviour: CON/NON requests, piggybacked ACKs, message deduplication per
(endpoint, message ID) with the same reply re-sent, RST for what it cannot process,
Block1 (RFC 7959) reassembly, and 4.xx/5.xx replies with diagnostic payloads. It never
raises out of `datagram_received`, whatever arrives.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.errors import UplinkRejected
from gateway.ingest.coap import numbers as C
from gateway.ingest.coap import wire
from gateway.model import Uplink, Verdict
from gateway.runtime.metrics import Metrics

log = logging.getLogger(__name__)

# A device's (host, port, ...) as the socket gives it; or, for a datagram another gateway
# host relayed here (gateway/cluster/peers.py), (host, port, send): replies go through
# `send`, back to the host the device talks to.
Address = tuple[Any, ...]
BLOCK_STATE_LIFETIME_S = C.EXCHANGE_LIFETIME_S
MAX_BLOCK_TRANSFERS = 10_000


# Given a request and its datagram, forwards it to the worker owning its device and
# returns True, or returns False: this process handles it (gateway/runtime/siblings.py).
Router = Callable[[wire.Message, bytes, "Address"], bool]


def uplink_device_id(path: list[str]) -> str:
    """The device of an uplink path `/up/{device_id}`, or "" for any other path."""
    return path[1] if len(path) == 2 and path[0] == "up" else ""


def request_path(msg: wire.Message) -> list[str]:
    return [value.decode("utf-8", "replace") for number, value in msg.options
            if number == C.URI_PATH]


LWM2M_ROOTS = frozenset({"rd", "dp"})  # the LwM2M registration and Send interfaces


class Lwm2mSink(Protocol):
    """The LwM2M server (gateway/ingest/lwm2m) as the CoAP server sees it."""

    def request(self, code: int, addr: Address, path: list[str], query: list[str],
                content_format: int | None, payload: bytes, uplink: Uplink,
                reply: Callable[[Verdict], None], dtls_remote: object | None = None) -> None:
        """A request on /rd or /dp; `reply` is called once. `uplink` (no device yet) is
        for rejections; `dtls_remote`: it came over coaps, on this aiocoap session."""

    def response(self, msg: wire.Message, addr: Address) -> bool:
        """An ACK, RST or response from a device: True if it answers one of our requests
        (the LwM2M server then ACKs a CON response itself)."""


class UplinkSink(Protocol):
    """The pipeline as ingest sees it."""

    def submit(self, uplink: Uplink, reply: Callable[[Verdict], None]) -> None: ...

    def reject(
        self, uplink: Uplink, rejection: UplinkRejected, reply: Callable[[Verdict], None]
    ) -> None: ...


@dataclass(slots=True)
class _BlockTransfer:
    body: bytearray
    expires_at: float


class CoapServer(asyncio.DatagramProtocol):
    def __init__(
        self,
        sink: UplinkSink,
        metrics: Metrics,
        *,
        max_payload_bytes: int,
        dedup_max_entries: int,
        transport_name: str = "coap",
        router: Router | None = None,
        lwm2m: Lwm2mSink | None = None,
    ) -> None:
        self._sink = sink
        self._metrics = metrics
        self._max_payload = max_payload_bytes
        self._dedup_max = dedup_max_entries
        self._transport_name = transport_name
        self._router = router
        self.lwm2m = lwm2m  # set once: the LwM2M server needs this server to send
        self._transport: asyncio.DatagramTransport | None = None
        self._replies: dict[tuple[Address, int], bytes] = {}
        self._reply_expiry: deque[tuple[float, tuple[Address, int]]] = deque()
        self._blocks: dict[tuple[Address, tuple[bytes, ...]], _BlockTransfer] = {}
        self._next_mid = int.from_bytes(os.urandom(2), "big")
        self._received: tuple[float, float] | None = None  # the batch's (wall, monotonic)

    # -- asyncio plumbing ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error (ICMP from a peer): %s", exc)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- receiving -------------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: Address) -> None:
        try:
            self._receive(data, addr)
        except Exception:  # task boundary: one datagram must never stop the server
            log.exception("unexpected error handling a datagram from %s", format_address(addr))
            self._metrics.malformed_datagrams.inc()

    def datagrams_received(self, datagrams: list[tuple[bytes, Address]],
                           received: tuple[float, float]) -> None:
        """Datagrams read together (gateway/ingest/coap/udp.py), each stamped with the time the
        batch was noticed: a wait before reading counts in its uplinks' latency."""
        self._received = received
        try:
            for data, addr in datagrams:
                self.datagram_received(data, addr)
        finally:
            self._received = None

    def _receive(self, data: bytes, addr: Address) -> None:
        try:
            msg = wire.decode(data)
        except wire.CoapFormatError:
            self._metrics.malformed_datagrams.inc()
            # RFC 7252 4.2: a CON we cannot parse is rejected with RST, if its header is readable.
            if len(data) >= 4 and data[0] >> 6 == 1 and (data[0] >> 4) & 3 == C.CON:
                self._send(wire.encode(wire.Message(C.RST, C.EMPTY, (data[2] << 8) | data[3])), addr)
            return
        if msg.mtype == C.ACK or msg.mtype == C.RST:
            if self.lwm2m is not None:  # the LwM2M server's requests; else nothing to match
                self.lwm2m.response(msg, addr)
            return
        if msg.code >> 5 != 0 and self.lwm2m is not None and self.lwm2m.response(msg, addr):
            return  # a response to, or a notification for, the LwM2M server's request
        if msg.code == C.EMPTY or msg.code >> 5 != 0:
            # CoAP ping (empty CON) or a response sent to us: RST a CON, ignore a NON.
            if msg.mtype == C.CON:
                self._send(wire.encode(wire.Message(C.RST, C.EMPTY, msg.mid)), addr)
            return
        if self._router is not None and len(addr) != 3 and self._router(msg, data, addr):
            # Another worker or host owns this device: its reply cache and state answer.
            # A relayed datagram is ours: never relayed twice.
            return
        key = (addr[:2], msg.mid)
        cached = self._replies.get(key)
        if cached is not None and not _same_token(cached, msg.token):
            # Same endpoint and message ID but another token: not a retransmission but a new
            # request, e.g. another device behind a carrier NAT that reused the port.
            cached = None
        if cached is not None:
            self._metrics.coap_retransmissions.inc()
            if cached[1] != C.EMPTY:  # else still being processed: its reply will come
                self._send(cached, addr)
            return
        self._remember(key, _pending(msg.token))
        try:
            self._request(msg, addr, key)
        except Exception:  # a bug must cost one 5.00, not the device's retransmissions
            log.exception("internal error handling a request from %s", format_address(addr))
            self._metrics.uplinks_rejected.labels("internal_error").inc()
            self._respond(msg, addr, key, Verdict(C.INTERNAL_SERVER_ERROR, b"internal error",
                                                  C.CONTENT_FORMAT_TEXT), None)

    def _request(self, msg: wire.Message, addr: Address, key: tuple[Address, int]) -> None:
        received_at, received_mono = self._received or (time.time(), time.monotonic())
        path: list[str] = []
        query: list[str] = []
        content_format: int | None = None
        block1: wire.Block | None = None
        size1: int | None = None
        bad_option: UplinkRejected | None = None  # the first one; parsing goes on for the dead letter
        for number, value in msg.options:
            if number == C.URI_PATH:
                path.append(value.decode("utf-8", "replace"))
            elif number == C.URI_QUERY:
                query.append(value.decode("utf-8", "replace"))
            elif number == C.CONTENT_FORMAT:
                # RFC 7252 5.4.3: a value longer than the option's 0-2 bytes makes it an
                # unrecognized option; an elective one is then ignored (JSON is assumed).
                if len(value) <= 2:
                    content_format = wire.uint_of(value)
            elif number == C.BLOCK1:
                try:
                    block1 = wire.Block.parse(value)
                except wire.CoapFormatError:
                    # RFC 7252 5.4.3: a bad length makes it an unrecognized, critical option.
                    bad_option = bad_option or UplinkRejected(
                        C.BAD_OPTION, "bad_option", "Block1 longer than 3 bytes")
            elif number == C.SIZE1:
                if len(value) <= 4:  # likewise: 0-4 bytes, else ignored
                    size1 = wire.uint_of(value)
            elif number == C.PROXY_URI or number == C.PROXY_SCHEME:
                bad_option = bad_option or UplinkRejected(
                    C.PROXYING_NOT_SUPPORTED, "proxying_not_supported", "no proxying")
            elif number & 1 and number not in C.UNDERSTOOD_OPTIONS:
                bad_option = bad_option or UplinkRejected(
                    C.BAD_OPTION, "bad_option", f"critical option {number}")

        lwm2m = self.lwm2m is not None and bool(path) and path[0] in LWM2M_ROOTS
        device_id = uplink_device_id(path)
        token = None
        for q in query:
            if q.startswith("k="):
                token = q[2:]  # option values are already percent-decoded (RFC 7252 6.4)
        uplink = Uplink(device_id, token, content_format, msg.payload, self._transport_name,
                        format_address(addr), received_at, received_mono)

        def reply(verdict: Verdict, block: wire.Block | None = block1) -> None:
            self._respond(msg, addr, key, verdict, block)

        if bad_option is not None:
            self._sink.reject(uplink, bad_option, reply)
            return
        if not device_id and not lwm2m:
            self._sink.reject(uplink, UplinkRejected(
                C.NOT_FOUND, "unknown_path", "POST to /up/{device_id}?k={token}"), reply)
            return
        if msg.code != C.POST and msg.code != C.PUT and not lwm2m:
            self._sink.reject(uplink, UplinkRejected(
                C.METHOD_NOT_ALLOWED, "method_not_allowed", "use POST or PUT"), reply)
            return
        if block1 is not None:
            if block1.szx == wire.Block.RESERVED_SZX:
                self._sink.reject(uplink, UplinkRejected(
                    C.BAD_REQUEST, "bad_block", "Block1 size exponent 7 is reserved"), reply)
                return
            if (size1 or 0) > self._max_payload:
                self._sink.reject(uplink, self._too_large(), reply)
                return
            try:
                body = self._block1(msg, addr, key, block1, path, query)
            except UplinkRejected as out_of_order:
                self._sink.reject(uplink, out_of_order, reply)
                return
            if body is None:
                return  # answered 2.31 Continue
            if len(body) > self._max_payload:
                self._sink.reject(uplink, self._too_large(), reply)
                return
            uplink = Uplink(device_id, token, content_format, body, self._transport_name,
                            uplink.remote, received_at, received_mono)
        elif len(msg.payload) > self._max_payload:
            self._sink.reject(uplink, self._too_large(), reply)
            return
        if lwm2m:
            assert self.lwm2m is not None
            self.lwm2m.request(msg.code, addr, path, query, content_format, uplink.payload,
                               uplink, reply)
            return
        self._sink.submit(uplink, reply)

    def _too_large(self) -> UplinkRejected:
        return UplinkRejected(C.REQUEST_ENTITY_TOO_LARGE, "payload_too_large",
                              f"max {self._max_payload} bytes")

    def _block1(
        self,
        msg: wire.Message,
        addr: Address,
        key: tuple[Address, int],
        block: wire.Block,
        path: list[str],
        query: list[str],
    ) -> bytes | None:
        """Collect one Block1 block; the whole body once the last one arrives."""
        now = time.monotonic()
        transfer_key = (addr[:2], tuple(s.encode() for s in (*path, "?", *query)))
        transfer = self._blocks.get(transfer_key)
        if block.num == 0:
            if len(self._blocks) >= MAX_BLOCK_TRANSFERS:
                self._expire_blocks(now)
            transfer = _BlockTransfer(bytearray(), now + BLOCK_STATE_LIFETIME_S)
            self._blocks[transfer_key] = transfer
        offset = block.num * block.size
        if transfer is None or offset != len(transfer.body) or (block.more and
                                                                 len(msg.payload) != block.size):
            self._blocks.pop(transfer_key, None)
            raise UplinkRejected(C.REQUEST_ENTITY_INCOMPLETE, "block_out_of_order",
                                 "block out of order; restart at block 0")
        transfer.body += msg.payload
        if len(transfer.body) > self._max_payload:
            self._blocks.pop(transfer_key, None)
            return bytes(transfer.body)  # the caller answers 4.13
        if block.more:
            self._respond(msg, addr, key, Verdict(C.CONTINUE), block)
            return None
        del self._blocks[transfer_key]
        return bytes(transfer.body)

    def _expire_blocks(self, now: float) -> None:
        for k in [k for k, t in self._blocks.items() if t.expires_at < now]:
            del self._blocks[k]
        while len(self._blocks) >= MAX_BLOCK_TRANSFERS:
            del self._blocks[next(iter(self._blocks))]

    # -- replying --------------------------------------------------------------------
    def _respond(
        self,
        request: wire.Message,
        addr: Address,
        key: tuple[Address, int],
        verdict: Verdict,
        block: wire.Block | None,
    ) -> None:
        if (request.mtype == C.CON and not verdict.payload and verdict.max_age_s is None
                and block is None and verdict.code < C.BAD_REQUEST and not verdict.location):
            data = wire.encode_ack(verdict.code, request.mid, request.token)  # a bare 2.04
        else:
            data = self._encode_reply(request, verdict, block)
        cached = self._replies.get(key)
        if cached is not None and cached[1] == C.EMPTY and _same_token(cached, request.token):
            self._replies[key] = data  # the reply a retransmission of this request gets
        self._send(data, addr)

    def _encode_reply(self, request: wire.Message, verdict: Verdict, block: wire.Block | None
                      ) -> bytes:
        options: list[tuple[int, bytes]] = []
        if verdict.content_format is not None and verdict.payload:
            options.append((C.CONTENT_FORMAT, wire.uint_value(verdict.content_format)))
        if verdict.max_age_s is not None:
            options.append((C.MAX_AGE, wire.uint_value(verdict.max_age_s)))
        if block is not None and verdict.code in (C.CONTINUE, C.CHANGED):
            options.append((C.BLOCK1, block.encode()))
        options.extend((C.LOCATION_PATH, segment.encode()) for segment in verdict.location)
        if verdict.code == C.REQUEST_ENTITY_TOO_LARGE:
            options.append((C.SIZE1, wire.uint_value(self._max_payload)))
        if request.mtype == C.CON:
            mtype, mid = C.ACK, request.mid
        else:
            mtype, mid = C.NON, self.next_mid()
        data = wire.encode(wire.Message(mtype, verdict.code, mid, request.token, options,
                                        verdict.payload))
        if verdict.code >= C.BAD_REQUEST and not verdict.authenticated:
            data = self._no_amplification(request, data, mtype, verdict.code, mid, options,
                                          verdict.payload)
        return data

    @staticmethod
    def _no_amplification(request: wire.Message, data: bytes, mtype: int, code: int, mid: int,
                          options: list[tuple[int, bytes]], payload: bytes) -> bytes:
        """RFC 7252 11.3: an error reply is never larger than the request it answers, so
        a spoofed source cannot turn the gateway into an amplifier. Shorten the
        diagnostic first, then drop the options."""
        excess = len(data) - len(wire.encode(request))
        if excess <= 0:
            return data
        if excess < len(payload):
            payload = payload[:len(payload) - excess].decode("utf-8", "ignore").encode()
            return wire.encode(wire.Message(mtype, code, mid, request.token, options, payload))
        return wire.encode(wire.Message(mtype, code, mid, request.token))

    def _send(self, data: bytes, addr: Address) -> None:
        if len(addr) == 3:
            addr[2](data, addr[:2])  # relayed: the reply goes back through its host
        elif self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(data, addr)

    def next_mid(self) -> int:
        """A message ID for a message this server starts (a NON reply, an LwM2M request)."""
        self._next_mid = (self._next_mid + 1) & 0xFFFF
        return self._next_mid

    def send(self, data: bytes, addr: Address) -> None:
        """A message this server starts (the LwM2M server's requests and ACKs)."""
        self._send(data, addr)

    def send_to_device(self, data: bytes, addr: Address) -> None:
        """A reply the device's owner (another gateway host) made, sent from our socket."""
        self._send(data, addr[:2])

    # -- the reply cache (RFC 7252 4.5) ------------------------------------------------
    def _remember(self, key: tuple[Address, int], data: bytes) -> None:
        now = time.monotonic()
        expiry = self._reply_expiry
        while expiry and (expiry[0][0] < now or len(self._replies) >= self._dedup_max):
            _, old = expiry.popleft()
            self._replies.pop(old, None)
        self._replies[key] = data
        expiry.append((now + C.EXCHANGE_LIFETIME_S, key))


def _pending(token: bytes) -> bytes:
    """The reply cache's entry while a request is processed: a header without a code (0.00,
    never a reply we send) and the request's token, so the token check covers it too."""
    return bytes((0x40 | len(token), C.EMPTY, 0, 0)) + token


def _same_token(cached: bytes, token: bytes) -> bool:
    return cached[4:4 + (cached[0] & 0x0F)] == token


def format_address(addr: Address) -> str:
    """`host:port` (`[v6]:port`) for logs and dead letters; IPv4 without its ::ffff: prefix."""
    host = str(addr[0])
    if host.startswith("::ffff:"):
        host = host[7:]
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


def bind_udp(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A UDP socket for the server; `::` listens on IPv6 and IPv4 (dual stack). An OSError
    says what could not be bound: `coap: cannot bind udp HOST port PORT: REASON`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Room for a storm of reports between two event-loop turns.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"coap: cannot bind udp {host} port {port}: {e.strerror}"
                      ) from None
    return sock
