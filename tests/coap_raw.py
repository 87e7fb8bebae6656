"""A CoAP client on one plain UDP socket, for what aiocoap's client will not do on purpose:
retransmit with the same message ID, send from a chosen port, send malformed datagrams.
Requests are built and replies read with aiocoap's codec, so our own is not testing itself."""

from __future__ import annotations

import itertools
import json
import os
import socket
from typing import Any

import aiocoap
from aiocoap.numbers.types import Type

REPLY_TIMEOUT_S = 5.0
_mids = itertools.count(int.from_bytes(os.urandom(2), "big"))


def uplink_request(
    uri: str,
    payload: bytes | dict[str, Any],
    *,
    content_format: int | None = 50,
    code: aiocoap.Code = aiocoap.POST,
    mtype: Type = aiocoap.CON,
    mid: int | None = None,
    token: bytes | None = None,
) -> aiocoap.Message:
    """An uplink as a device sends it; a dict payload is JSON-encoded."""
    body = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    message = aiocoap.Message(code=code, uri=uri, payload=body)
    if content_format is not None:
        message.opt.content_format = content_format
    message.mtype = mtype
    message.mid = next(_mids) & 0xFFFF if mid is None else mid
    message.token = os.urandom(4) if token is None else token
    return message


class RawCoap:
    """One UDP socket on a loopback port of its own: one device endpoint."""

    def __init__(self, server_port: int, host: str = "127.0.0.1") -> None:
        self.server = (host, server_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(REPLY_TIMEOUT_S)

    def __enter__(self) -> RawCoap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes | aiocoap.Message) -> None:
        self.sock.sendto(data.encode() if isinstance(data, aiocoap.Message) else data, self.server)

    def receive_bytes(self, timeout: float = REPLY_TIMEOUT_S) -> bytes:
        """The next datagram from the server; fails the test (socket.timeout) if none comes."""
        self.sock.settimeout(timeout)
        data, _ = self.sock.recvfrom(65535)
        return data

    def receive(self, timeout: float = REPLY_TIMEOUT_S) -> aiocoap.Message:
        return aiocoap.Message.decode(self.receive_bytes(timeout))

    def exchange(self, request: aiocoap.Message) -> aiocoap.Message:
        """Send one request, return the reply matching its token."""
        self.send(request)
        while True:
            reply = self.receive()
            if reply.token == request.token:
                return reply
