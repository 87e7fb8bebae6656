"""Requests the gateway sends to devices (LwM2M Read, Write, Execute, Observe...): CON with
RFC 7252 retransmission, matched back by message ID (a piggybacked or empty ACK, a RST) and
by token (a separate response, a notification).

The CoAP server hands over every ACK, RST and response it receives; this module owns the
timers. A request ends exactly once: with the device's response, or with None once
MAX_RETRANSMIT retransmissions went unanswered (~93 s with the default parameters), or
with None on a RST. It never blocks and never raises into the CoAP server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.ingest.coap import numbers as C
from gateway.ingest.coap import wire
from gateway.ingest.coap.server import Address

log = logging.getLogger(__name__)

# RFC 7252 4.8, the default transmission parameters.
ACK_TIMEOUT_S = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4
# After the ACK, how long a separate response may take (the device is working on it).
SEPARATE_RESPONSE_S = 60.0

Done = Callable[[wire.Message | None], None]
# A notification, its address, and what ACKs it (a no-op unless it came CON): called by
# the taker once the reading is durable, so a device never sees a reading acknowledged
# that a crash could lose; until then its retransmissions are ignored.
Notify = Callable[[wire.Message, Address, Callable[[], None]], None]
NOTIFY_DEDUP_ENTRIES = 50_000


@dataclass(slots=True)
class _Exchange:
    addr: Address
    mid: int
    token: bytes
    data: bytes
    done: Done
    attempts: int = 0
    timer: asyncio.TimerHandle | None = None
    acked: bool = False  # an empty ACK came: the response will be separate
    observing: bool = False  # kept after the first response: notifications follow
    on_notify: Notify | None = None
    finished: bool = field(default=False)


class Requester:
    def __init__(self, send: Callable[[bytes, Address], None], next_mid: Callable[[], int],
                 ack_timeout_s: float = ACK_TIMEOUT_S) -> None:
        self._send = send
        self._next_mid = next_mid
        self._ack_timeout_s = ack_timeout_s
        self._by_mid: dict[tuple[tuple[object, ...], int], _Exchange] = {}
        self._by_token: dict[bytes, _Exchange] = {}
        # CON notifications by (endpoint, message ID): b"" while being taken, then the ACK
        # sent (RFC 7252 4.5: a retransmission gets the same ACK), oldest dropped first.
        self._notified: dict[tuple[tuple[object, ...], int], bytes] = {}
        self.in_flight = 0

    def request(self, addr: Address, code: int, options: list[tuple[int, bytes]],
                payload: bytes, done: Done, *, token: bytes | None = None,
                on_notify: Notify | None = None) -> bytes:
        """Send a CON request; `done(response or None)` once. With `on_notify` (an Observe
        registration) the token stays known after the first response and each later
        notification goes to `on_notify`. Returns the token."""
        token = token if token is not None else os.urandom(8)
        mid = self._next_mid()
        data = wire.encode(wire.Message(C.CON, code, mid, token, options, payload))
        exchange = _Exchange(addr, mid, token, data, done, on_notify=on_notify)
        self._by_mid[(addr[:2], mid)] = exchange
        self._by_token[token] = exchange
        self.in_flight += 1
        self._transmit(exchange)
        return token

    def observe(self, token: bytes, on_notify: Notify) -> None:
        """Take notifications for an observation made before (a restart: the token was
        kept with the registration)."""
        if token not in self._by_token:
            self._by_token[token] = _Exchange((), 0, token, b"", _ignore, observing=True,
                                              on_notify=on_notify, finished=True)

    def forget(self, token: bytes) -> None:
        """Stop taking notifications for `token` (the next one gets a RST)."""
        exchange = self._by_token.pop(token, None)
        if exchange is not None and not exchange.finished:
            self._finish(exchange, None)

    def _transmit(self, exchange: _Exchange) -> None:
        self._send(exchange.data, exchange.addr)
        timeout = self._ack_timeout_s * (2 ** exchange.attempts) * random.uniform(
            1.0, ACK_RANDOM_FACTOR)
        exchange.timer = asyncio.get_running_loop().call_later(timeout, self._timed_out, exchange)

    def _timed_out(self, exchange: _Exchange) -> None:
        if exchange.finished:
            return
        if exchange.acked:  # the separate response never came
            self._finish(exchange, None)
            return
        exchange.attempts += 1
        if exchange.attempts > MAX_RETRANSMIT:
            self._finish(exchange, None)
            return
        self._transmit(exchange)

    def _finish(self, exchange: _Exchange, response: wire.Message | None) -> None:
        exchange.finished = True
        self.in_flight -= 1
        if exchange.timer is not None:
            exchange.timer.cancel()
        self._by_mid.pop((exchange.addr[:2], exchange.mid), None)
        if not (exchange.observing and response is not None):
            self._by_token.pop(exchange.token, None)
        try:
            exchange.done(response)
        except Exception:  # a callback's bug must not stop the CoAP server
            log.exception("callback of a request to %s failed", exchange.addr[:2])

    # -- from the CoAP server ------------------------------------------------------------
    def received(self, msg: wire.Message, addr: Address) -> bool:
        """An ACK, RST or response: True if it belongs to one of our requests (a CON
        response is then ACKed here)."""
        if msg.mtype in (C.ACK, C.RST):
            exchange = self._by_mid.get((addr[:2], msg.mid))
            if exchange is None or exchange.finished:
                return msg.mtype == C.ACK and msg.code == C.EMPTY and msg.token == b""
            if msg.mtype == C.RST:
                self._by_token.pop(exchange.token, None)
                self._finish(exchange, None)
            elif msg.code == C.EMPTY:  # the response will come separately
                exchange.acked = True
                if exchange.timer is not None:
                    exchange.timer.cancel()
                exchange.timer = asyncio.get_running_loop().call_later(
                    SEPARATE_RESPONSE_S, self._timed_out, exchange)
            else:
                self._answered(exchange, msg, addr, no_ack)
            return True
        exchange = self._by_token.get(msg.token)
        if exchange is None:
            return False  # the CoAP server RSTs a CON it cannot place (RFC 7641 3.6)
        ack = no_ack
        if msg.mtype == C.CON:
            key = (addr[:2], msg.mid)
            cached = self._notified.get(key)
            if cached is not None:  # a retransmission: its ACK again, or still being taken
                if cached:
                    self._send(cached, addr)
                return True
            if len(self._notified) >= NOTIFY_DEDUP_ENTRIES:
                del self._notified[next(iter(self._notified))]
            self._notified[key] = b""
            ack_bytes = wire.encode(wire.Message(C.ACK, C.EMPTY, msg.mid))

            def ack() -> None:
                if key in self._notified:
                    self._notified[key] = ack_bytes
                self._send(ack_bytes, addr)
        self._answered(exchange, msg, addr, ack)
        return True

    def _answered(self, exchange: _Exchange, msg: wire.Message, addr: Address,
                  ack: Callable[[], None]) -> None:
        if not exchange.finished:
            exchange.observing = (exchange.on_notify is not None and msg.code >> 5 == 2
                                  and msg.option(C.OBSERVE) is not None)
            self._finish(exchange, msg)
            if not exchange.observing:
                ack()
                return
        if exchange.on_notify is None:
            ack()
            return
        try:
            exchange.on_notify(msg, addr, ack)
        except Exception:
            log.exception("notification from %s failed", addr[:2])


def _ignore(_: wire.Message | None) -> None:
    pass


def no_ack() -> None:
    """The ack of a notification that came NON (or over coaps, where aiocoap ACKs)."""
