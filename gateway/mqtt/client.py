"""A lean MQTT 3.1.1 client on asyncio: CONNECT (will, credentials, TLS), PUBLISH QoS 0/1
with a callback per PUBACK, SUBSCRIBE, keepalive, DISCONNECT.

Why not aiomqtt here: see docs/decisions.md (paho's per-publish bookkeeping cost ~4x our
whole pipeline). It never hides a lost connection: `closed` completes, with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0
CONNACK_REASONS = {
    1: "unacceptable protocol version", 2: "client identifier rejected",
    3: "server unavailable", 4: "bad user name or password", 5: "not authorized",
}
_PINGREQ_PACKET = bytes((PINGREQ, 0))
_DISCONNECT_PACKET = bytes((DISCONNECT, 0))


class MqttError(Exception):
    """The broker refused us, or the connection broke."""


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class Incoming:
    topic: str
    payload: bytes
    retain: bool
    packet_id: bytes = b""  # QoS 1: acknowledge with `MqttClient.ack` once it is handled


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + _remaining_length(len(body)) + body


class MqttClient(asyncio.Protocol):
    """One broker connection. `await MqttClient.connect(...)`, then publish/subscribe."""

    def __init__(self, keepalive_s: int) -> None:
        self.keepalive_s = keepalive_s
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._out: list[bytes] = []  # packets written this loop iteration, sent together
        self._loop = asyncio.get_running_loop()
        self._connack: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._next_id = 0
        self._pending_acks: dict[int, Callable[[], None]] = {}
        self._suback: dict[int, asyncio.Future[bytes]] = {}
        self.messages: asyncio.Queue[Incoming] = asyncio.Queue()
        self._pinger: asyncio.Task[None] | None = None
        self._heard_from_broker = True

    # -- connecting ------------------------------------------------------------------
    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        client_id: str,
        keepalive_s: int = 30,
        username: str | None = None,
        password: str | None = None,
        will: Will | None = None,
        tls: ssl.SSLContext | None = None,
        timeout_s: float = 10.0,
        clean_session: bool = True,
    ) -> MqttClient:
        loop = asyncio.get_running_loop()
        client = cls(keepalive_s)
        try:
            async with asyncio.timeout(timeout_s):
                await loop.create_connection(lambda: client, host, port, ssl=tls)
                client._send_connect(client_id, username, password, will, clean_session)
                await client._connack
        except TimeoutError:
            client.abort()
            raise MqttError(f"no CONNACK from {host}:{port} within {timeout_s}s") from None
        except OSError as e:
            raise MqttError(f"cannot connect to {host}:{port}: {e.strerror or e}") from None
        except MqttError:
            client.abort()
            raise
        client._pinger = asyncio.create_task(client._keepalive(), name="mqtt-keepalive")
        return client

    def _send_connect(self, client_id: str, username: str | None, password: str | None,
                      will: Will | None, clean_session: bool) -> None:
        flags = 0x02 if clean_session else 0x00
        payload = _string(client_id)
        if will is not None:
            flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
            payload += _string(will.topic) + _string(will.payload)
        if username is not None:
            flags |= 0x80
            payload += _string(username)
            if password is not None:
                flags |= 0x40
                payload += _string(password)
        header = _string("MQTT") + bytes((4, flags)) + struct.pack("!H", self.keepalive_s)
        self._write(_packet(CONNECT, header + payload))

    # -- publishing and subscribing --------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._pending_acks)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                on_ack: Callable[[], None] | None = None) -> None:
        """Send a PUBLISH now; for QoS 1 `on_ack` runs when its PUBACK arrives."""
        if self.closed.done():
            raise MqttError("not connected")
        topic_bytes = topic.encode()
        first = PUBLISH | (qos << 1) | (1 if retain else 0)
        if qos:
            packet_id = self._allocate_id()
            self._pending_acks[packet_id] = on_ack or _nothing
            body = b"".join((struct.pack("!H", len(topic_bytes)), topic_bytes,
                             struct.pack("!H", packet_id), payload))
        else:
            body = struct.pack("!H", len(topic_bytes)) + topic_bytes + payload
        self._write(_packet(first, body))

    async def publish_and_wait(self, topic: str, payload: bytes, qos: int = 1,
                               retain: bool = False, timeout_s: float = 10.0) -> None:
        acked: asyncio.Future[None] = self._loop.create_future()

        def on_ack() -> None:
            if not acked.done():
                acked.set_result(None)

        self.publish(topic, payload, qos, retain, on_ack)
        if qos:
            await self._until(acked, timeout_s, f"no PUBACK for {topic}")

    async def subscribe(self, topic_filter: str, qos: int = 1, timeout_s: float = 10.0) -> int:
        packet_id = self._allocate_id()
        granted: asyncio.Future[bytes] = self._loop.create_future()
        self._suback[packet_id] = granted
        self._write(_packet(SUBSCRIBE, struct.pack("!H", packet_id) + _string(topic_filter)
                            + bytes((qos,))))
        codes = await self._until(granted, timeout_s, f"no SUBACK for {topic_filter}")
        if not codes or codes[0] == 0x80:
            raise MqttError(f"broker refused the subscription to {topic_filter}")
        return codes[0]

    async def _until(self, fut: asyncio.Future[bytes] | asyncio.Future[None], timeout_s: float,
                     what: str) -> bytes:
        done, _ = await asyncio.wait({fut, self.closed}, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if fut in done:
            return fut.result() or b""
        if self.closed.done():
            raise MqttError(f"connection lost: {what}")
        raise MqttError(what)

    def _allocate_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._pending_acks and self._next_id not in self._suback:
                return self._next_id
        raise MqttError("all 65535 packet ids are in flight")

    # -- closing ---------------------------------------------------------------------
    async def disconnect(self) -> None:
        if self._transport is not None and not self.closed.done():
            self._write(_DISCONNECT_PACKET)
            self._flush()
            self._transport.close()
        with contextlib.suppress(MqttError):
            await self.closed
        self._stop_pinger()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._stop_pinger()

    def _stop_pinger(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()

    async def _keepalive(self) -> None:
        while not self.closed.done():
            self._heard_from_broker = False
            try:
                self._write(_PINGREQ_PACKET)
            except MqttError:
                return  # closed meanwhile: `closed` says why
            await asyncio.sleep(self.keepalive_s / 2)
            if not self._heard_from_broker:
                self._fail(MqttError(f"broker silent for {self.keepalive_s / 2:.0f}s "
                                     "(no PINGRESP)"))
                self.abort()
                return

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(MqttError(f"connection lost: {exc}" if exc else "connection closed by broker"))

    def _fail(self, error: MqttError) -> None:
        if not self.closed.done():
            self.closed.set_exception(error)
            self.closed.exception()  # mark retrieved: whoever cares awaits it
        if not self._connack.done():
            self._connack.set_exception(error)
        for fut in self._suback.values():
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved: `_until` reports the closed connection

    def _write(self, data: bytes) -> None:
        """Queue a packet; everything queued in one loop iteration leaves in one write (one
        send system call for a window of PUBLISHes instead of one each: ~6 µs a message)."""
        if self._transport is None or self._transport.is_closing():
            raise MqttError("not connected")
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        self._heard_from_broker = True
        buf = self._buffer
        buf += data
        pos = 0
        try:
            acks = self._pending_acks
            while True:
                # A run of PUBACKs (4 bytes each) is most of what the broker sends us.
                while pos + 4 <= len(buf) and buf[pos] == PUBACK and buf[pos + 1] == 2:
                    callback = acks.pop((buf[pos + 2] << 8) | buf[pos + 3], None)
                    pos += 4
                    if callback is not None:
                        callback()
                header = _fixed_header(buf, pos)
                if header is None:
                    break
                first, start, length = header
                if start + length > len(buf):
                    break  # the rest of this packet is still on its way
                self._handle(first, bytes(buf[start:start + length]))
                pos = start + length
        except (MqttError, struct.error, IndexError) as e:
            self._fail(MqttError(f"malformed packet from the broker: {e}"))
            self.abort()
            return
        if pos:
            del buf[:pos]

    def _handle(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == PUBACK:
            callback = self._pending_acks.pop(struct.unpack_from("!H", body)[0], None)
            if callback is not None:
                callback()
        elif kind == CONNACK:
            code = body[1] if len(body) >= 2 else 255
            if code == 0:
                if not self._connack.done():
                    self._connack.set_result(None)
            else:
                self._fail(MqttError(f"broker refused the connection: "
                                     f"{CONNACK_REASONS.get(code, f'code {code}')}"))
        elif kind == PUBLISH:
            self._receive_publish(first, body)
        elif kind == SUBACK:
            fut = self._suback.pop(struct.unpack_from("!H", body)[0], None)
            if fut is not None and not fut.done():
                fut.set_result(body[2:])
        # PINGRESP and anything else: hearing from the broker is all that counts

    def _receive_publish(self, first: int, body: bytes) -> None:
        qos = (first >> 1) & 0x03
        (topic_len,) = struct.unpack_from("!H", body)
        topic = body[2:2 + topic_len].decode("utf-8", "replace")
        pos = 2 + topic_len
        packet_id = b""
        if qos:
            packet_id = body[pos:pos + 2]
            pos += 2
        self.messages.put_nowait(Incoming(topic, body[pos:], bool(first & 0x01), packet_id))

    def ack(self, message: Incoming) -> None:
        """PUBACK a QoS 1 message: until then the broker keeps it (and, in a persistent
        session, sends it again after a reconnect)."""
        if message.packet_id and not self.closed.done():
            self._write(bytes((PUBACK, 2)) + message.packet_id)


def _fixed_header(buf: bytearray, pos: int) -> tuple[int, int, int] | None:
    """(first byte, body start, body length) of the packet at pos, None if incomplete."""
    length, shift, i = 0, 0, pos + 1
    while i < len(buf):
        byte = buf[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return buf[pos], i, length
        shift += 7
        if shift > 21:
            raise MqttError("malformed packet from the broker (remaining length)")
    return None


def _nothing() -> None:
    pass
