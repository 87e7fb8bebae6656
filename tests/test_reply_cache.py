"""The RFC 7252 reply cache while a request is still being processed: a retransmission
waits for the reply, but another request on the same endpoint and message ID (a second
device behind a carrier NAT that reused the port) is a request of its own."""

from __future__ import annotations

from typing import Any

import aiocoap
from prometheus_client import CollectorRegistry

from gateway.errors import UplinkRejected
from gateway.ingest.coap.server import CoapServer
from gateway.model import Uplink, Verdict
from gateway.runtime.metrics import Metrics
from tests.coap_raw import uplink_request

ADDR = ("192.0.2.7", 40000)
CHANGED = int(aiocoap.CHANGED)


class HeldSink:
    """The pipeline, but it answers only when the test says so."""

    def __init__(self) -> None:
        self.held: list[tuple[Uplink, Any]] = []

    def submit(self, uplink: Uplink, reply: Any) -> None:
        self.held.append((uplink, reply))

    def reject(self, uplink: Uplink, rejection: UplinkRejected, reply: Any) -> None:
        raise AssertionError(f"unexpected rejection: {rejection.reason}")


class Wire:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: object) -> None:
        self.sent.append(data)

    def is_closing(self) -> bool:
        return False


def request(token: bytes, seq: int) -> bytes:
    message = uplink_request(f"coap://gw/up/dev-{seq}?k=t", {"seq": seq}, mid=0x4242,
                             token=token)
    return message.encode()


def test_same_endpoint_and_message_id_with_another_token_is_a_new_request() -> None:
    sink, wire = HeldSink(), Wire()
    server = CoapServer(sink, Metrics(CollectorRegistry()), max_payload_bytes=1024,
                        dedup_max_entries=1000)
    server.connection_made(wire)  # type: ignore[arg-type]
    first, second = request(b"\x01\x01", 1), request(b"\x02\x02", 2)

    server.datagram_received(first, ADDR)
    server.datagram_received(first, ADDR)  # a retransmission: waits for the reply
    server.datagram_received(second, ADDR)  # another device's request: not swallowed
    assert [u.device_id for u, _ in sink.held] == ["dev-1", "dev-2"]
    assert wire.sent == []

    sink.held[1][1](Verdict(CHANGED))  # the second is answered first
    sink.held[0][1](Verdict(CHANGED))
    replies = [aiocoap.Message.decode(d) for d in wire.sent]
    assert [(r.token, str(r.code)) for r in replies] == [(b"\x02\x02", "2.04 Changed"),
                                                        (b"\x01\x01", "2.04 Changed")]

    server.datagram_received(second, ADDR)  # its retransmission: the same bytes again
    assert wire.sent[-1] == wire.sent[0]
    assert len(sink.held) == 2
