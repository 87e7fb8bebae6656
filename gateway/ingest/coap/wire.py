"""CoAP message wire format (RFC 7252 section 3) and option value helpers.

Pure functions on bytes, no I/O. Property-tested against aiocoap's codec; any input
either decodes or raises CoapFormatError, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

PAYLOAD_MARKER = 0xFF


class CoapFormatError(ValueError):
    """The datagram is not a well-formed CoAP message."""


@dataclass(slots=True)
class Message:
    mtype: int
    code: int
    mid: int
    token: bytes = b""
    options: list[tuple[int, bytes]] = field(default_factory=list)  # sorted by number
    payload: bytes = b""

    def option(self, number: int) -> bytes | None:
        for num, value in self.options:
            if num == number:
                return value
        return None


def decode(data: bytes) -> Message:
    n = len(data)
    if n < 4:
        raise CoapFormatError("shorter than the 4-byte header")
    b0 = data[0]
    if b0 >> 6 != 1:
        raise CoapFormatError("version is not 1")
    tkl = b0 & 0x0F
    if tkl > 8:
        raise CoapFormatError("token length over 8")
    code = data[1]
    mid = (data[2] << 8) | data[3]
    pos = 4 + tkl
    if pos > n:
        raise CoapFormatError("truncated token")
    token = data[4:pos]
    options: list[tuple[int, bytes]] = []
    number = 0
    payload = b""
    while pos < n:
        byte = data[pos]
        pos += 1
        if byte == PAYLOAD_MARKER:
            if pos == n:
                raise CoapFormatError("payload marker without payload")
            payload = data[pos:]
            break
        delta, length = byte >> 4, byte & 0x0F
        if delta == 13:
            if pos >= n:
                raise CoapFormatError("truncated option delta")
            delta = data[pos] + 13
            pos += 1
        elif delta == 14:
            if pos + 1 >= n:
                raise CoapFormatError("truncated option delta")
            delta = ((data[pos] << 8) | data[pos + 1]) + 269
            pos += 2
        elif delta == 15:
            raise CoapFormatError("reserved option delta 15")
        if length == 13:
            if pos >= n:
                raise CoapFormatError("truncated option length")
            length = data[pos] + 13
            pos += 1
        elif length == 14:
            if pos + 1 >= n:
                raise CoapFormatError("truncated option length")
            length = ((data[pos] << 8) | data[pos + 1]) + 269
            pos += 2
        elif length == 15:
            raise CoapFormatError("reserved option length 15")
        number += delta
        end = pos + length
        if end > n:
            raise CoapFormatError("option value runs past the datagram")
        options.append((number, data[pos:end]))
        pos = end
    if code == 0 and (tkl or options or payload):
        raise CoapFormatError("empty message with token, options or payload")
    return Message(b0 >> 4 & 0x03, code, mid, token, options, payload)


def _ext(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes((value - 13,))
    return 14, (value - 269).to_bytes(2, "big")


def encode_ack(code: int, mid: int, token: bytes) -> bytes:
    """`encode(Message(ACK, code, mid, token))`, for the reply most uplinks get (a bare 2.04)
    without building a Message."""
    return bytes((0x60 | len(token), code, mid >> 8, mid & 0xFF)) + token


def encode(msg: Message) -> bytes:
    out = bytearray(
        (0x40 | (msg.mtype << 4) | len(msg.token), msg.code, msg.mid >> 8, msg.mid & 0xFF)
    )
    out += msg.token
    last = 0
    for number, value in sorted(msg.options, key=lambda o: o[0]):
        d_nib, d_ext = _ext(number - last)
        l_nib, l_ext = _ext(len(value))
        out.append((d_nib << 4) | l_nib)
        out += d_ext
        out += l_ext
        out += value
        last = number
    if msg.payload:
        out.append(PAYLOAD_MARKER)
        out += msg.payload
    return bytes(out)


def uint_value(value: int) -> bytes:
    """Option value of a uint option: shortest big-endian form, zero is empty."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b""


def uint_of(value: bytes) -> int:
    return int.from_bytes(value, "big")


@dataclass(slots=True, frozen=True)
class Block:
    """A Block1/Block2 option value (RFC 7959 2.2)."""

    num: int
    more: bool
    szx: int

    RESERVED_SZX: ClassVar[int] = 7  # 2048 bytes: BERT, CoAP over TCP only (RFC 8323)

    @property
    def size(self) -> int:
        return 1 << (self.szx + 4)

    @classmethod
    def parse(cls, value: bytes) -> Block:
        if len(value) > 3:
            raise CoapFormatError("block option longer than 3 bytes")
        v = uint_of(value)
        return cls(v >> 4, bool(v & 0x08), v & 0x07)

    def encode(self) -> bytes:
        return uint_value((self.num << 4) | (0x08 if self.more else 0) | self.szx)
