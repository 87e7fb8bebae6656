"""Duplicates: a CON retransmission gets the byte-identical reply (RFC 7252 4.5); the same
(device, seq) again, from any port or at the same moment, is answered 2.04 and published once.

"Published once" is proven with a barrier: a later uplink of the same device is sent after the
duplicate, and the spool publishes in order, so once the barrier arrives a duplicate would have."""

from __future__ import annotations

from collections.abc import Callable

import aiocoap

from tests.coap_raw import RawCoap, uplink_request
from tests.conftest import DEVICES, Gateway, Subscription

TH = DEVICES[0]
DUPLICATES = "nbiot_gateway_uplinks_duplicate_total"


def seqs_published_through(sub: Subscription, barrier_seq: int) -> list[int]:
    """Seqs published up to and including `barrier_seq` (waits for the barrier)."""
    messages = sub.wait_count(1)
    while barrier_seq not in [m["seq"] for m in messages]:
        messages = sub.wait_count(len(messages) + 1)
    return sorted(m["seq"] for m in messages)


def send_barrier(gateway: Gateway, seq: int) -> None:
    with RawCoap(gateway.coap_port) as device:
        reply = device.exchange(uplink_request(gateway.uri(TH), {"seq": seq, "temperature": 1.0}))
    assert reply.code == aiocoap.CHANGED


def test_con_retransmission_gets_the_identical_reply_and_is_published_once(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("nbiot/#")
    request = uplink_request(gateway.uri(TH), {"seq": 1, "temperature": 20.0})

    with RawCoap(gateway.coap_port) as device:
        device.send(request)
        first = device.receive_bytes()
        device.send(request)  # the ACK was "lost": same message ID, same port
        second = device.receive_bytes()
    send_barrier(gateway, seq=2)

    assert aiocoap.Message.decode(first).code == aiocoap.CHANGED
    assert second == first
    assert seqs_published_through(sub, barrier_seq=2) == [1, 2]
    assert gateway.metric("nbiot_gateway_coap_retransmissions_total") == 1
    assert gateway.metric("nbiot_gateway_uplinks_received_total") == 2


def test_con_retransmission_of_a_refused_uplink_gets_the_same_refusal(gateway: Gateway) -> None:
    request = uplink_request(gateway.uri(TH, "wrong"), {"seq": 1, "temperature": 20.0})

    with RawCoap(gateway.coap_port) as device:
        device.send(request)
        first = device.receive_bytes()
        device.send(request)
        second = device.receive_bytes()

    assert aiocoap.Message.decode(first).code == aiocoap.UNAUTHORIZED
    assert second == first
    assert gateway.metric("nbiot_gateway_uplinks_rejected_total", {"reason": "bad_token"}) == 1


def test_same_seq_from_a_new_source_port_gets_2_04_and_is_published_once(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("nbiot/#")
    body = {"seq": 5, "temperature": 20.0}

    with RawCoap(gateway.coap_port) as before_nat_rebinding:
        first = before_nat_rebinding.exchange(uplink_request(gateway.uri(TH), body))
    with RawCoap(gateway.coap_port) as after_nat_rebinding:
        second = after_nat_rebinding.exchange(uplink_request(gateway.uri(TH), body))
    send_barrier(gateway, seq=6)

    assert (first.code, second.code) == (aiocoap.CHANGED, aiocoap.CHANGED)
    assert seqs_published_through(sub, barrier_seq=6) == [5, 6]
    assert gateway.metric(DUPLICATES) == 1
    assert gateway.metric("nbiot_gateway_uplinks_accepted_total") == 2


def test_concurrent_duplicates_both_get_2_04_and_one_is_published(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("nbiot/#")
    body = {"seq": 9, "temperature": 20.0}

    with RawCoap(gateway.coap_port) as one, RawCoap(gateway.coap_port) as other:
        requests = [uplink_request(gateway.uri(TH), body) for _ in range(2)]
        one.send(requests[0])
        other.send(requests[1])  # before the first is durable and answered
        replies = [one.receive(), other.receive()]
    send_barrier(gateway, seq=10)

    assert [r.code for r in replies] == [aiocoap.CHANGED, aiocoap.CHANGED]
    assert [r.token for r in replies] == [r.token for r in requests]
    assert seqs_published_through(sub, barrier_seq=10) == [9, 10]
    assert gateway.metric(DUPLICATES) == 1


def test_uplinks_without_seq_are_never_taken_for_duplicates(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("nbiot/#")

    with RawCoap(gateway.coap_port) as device:
        for _ in range(2):
            device.exchange(uplink_request(gateway.uri(TH), {"temperature": 20.0}))
    send_barrier(gateway, seq=1)

    assert [m["seq"] for m in sub.wait_count(3)] == [None, None, 1]
    assert gateway.metric(DUPLICATES) == 0


def test_same_message_id_with_another_token_is_a_new_request_not_a_retransmission(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    # Behind a carrier NAT, another device may get the same public port and pick the same
    # message ID within EXCHANGE_LIFETIME; its token tells it apart.
    sub = subscribe("nbiot/#")
    first = uplink_request(gateway.uri(TH), {"seq": 1, "temperature": 20.0}, mid=4242,
                           token=b"\x01\x01")
    second = uplink_request(gateway.uri(TH), {"seq": 2, "temperature": 21.0}, mid=4242,
                            token=b"\x02\x02")

    with RawCoap(gateway.coap_port) as endpoint:
        first_reply = endpoint.exchange(first)
        second_reply = endpoint.exchange(second)

    assert (first_reply.code, second_reply.code) == (aiocoap.CHANGED, aiocoap.CHANGED)
    assert second_reply.token == b"\x02\x02"
    assert [m["seq"] for m in sub.wait_count(2)] == [1, 2]
    assert gateway.metric("nbiot_gateway_coap_retransmissions_total") == 0
