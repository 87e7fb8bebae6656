"""Abuse limits: the per-device token bucket (4.29 with Max-Age), error replies to
unauthenticated requests never larger than the request (RFC 7252 11.3)."""

from __future__ import annotations

from collections.abc import Callable

import aiocoap

from tests.coap_raw import RawCoap, uplink_request
from tests.conftest import DEVICES, Gateway

TH, PM = DEVICES[0], DEVICES[2]


def test_device_over_its_rate_gets_4_29_with_max_age_and_others_are_unaffected(
    gateway_factory: Callable[..., Gateway],
) -> None:
    gateway = gateway_factory(NBIOT_LIMITS__PER_DEVICE_RATE="0.01",
                              NBIOT_LIMITS__PER_DEVICE_BURST="3")
    with RawCoap(gateway.coap_port) as device:
        codes = [device.exchange(uplink_request(
            gateway.uri(TH), {"seq": seq, "temperature": 20.0})) for seq in range(1, 6)]
        neighbour = device.exchange(uplink_request(gateway.uri(PM), {"seq": 1, "voltage": 230}))

    assert [r.code for r in codes] == [aiocoap.CHANGED] * 3 + [aiocoap.TOO_MANY_REQUESTS] * 2
    assert 1 <= codes[3].opt.max_age <= 100  # one token per 100 s at 0.01/s
    assert neighbour.code == aiocoap.CHANGED
    assert gateway.metric("nbiot_gateway_uplinks_rejected_total", {"reason": "rate_limited"}) == 2
    assert gateway.metric("nbiot_gateway_dead_letters_total") == 0  # volume is not bad input


def test_error_reply_to_an_unauthenticated_request_is_never_larger_than_it(
    gateway: Gateway,
) -> None:
    tiny = uplink_request(f"coap://127.0.0.1:{gateway.coap_port}/x", b"", content_format=None,
                          token=b"")
    unknown = uplink_request(gateway.uri("nobody", "k"), b"{}", token=b"")

    with RawCoap(gateway.coap_port) as spoofer:
        spoofer.send(tiny)
        tiny_reply = spoofer.receive_bytes()
        spoofer.send(unknown)
        unknown_reply = spoofer.receive_bytes()

    assert aiocoap.Message.decode(tiny_reply).code == aiocoap.NOT_FOUND
    assert len(tiny_reply) <= len(tiny.encode())
    assert aiocoap.Message.decode(unknown_reply).code == aiocoap.NOT_FOUND
    assert len(unknown_reply) <= len(unknown.encode())


def test_authenticated_device_gets_its_whole_diagnostic(gateway: Gateway) -> None:
    with RawCoap(gateway.coap_port) as device:
        reply = device.exchange(uplink_request(gateway.uri(TH), b"{}", token=b""))

    assert reply.code == aiocoap.BAD_REQUEST
    assert reply.payload == b"temperature: Field required"
