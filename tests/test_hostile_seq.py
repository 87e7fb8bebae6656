"""Hostile seq values through the public contract: a huge seq, or a huge jump, is answered
at once and never locks the device out or wears the gateway down (issue 13, defect 2).

What a huge jump means for replay protection: the device's mark moves up there, so a lower
seq is stale from then on unless its `ts` is newer than the last one accepted (a counter
restarted by a reboot); the gateway answers 4.00 stale_seq saying so, never 5.00."""

from __future__ import annotations

from collections.abc import Callable

import aiocoap

from tests.coap_raw import RawCoap, uplink_request
from tests.conftest import DEVICES, Gateway, Subscription

TH = DEVICES[0]
INT64_MAX = 2**63 - 1


def send(gateway: Gateway, body: dict[str, object]) -> aiocoap.Message:
    with RawCoap(gateway.coap_port) as device:
        return device.exchange(uplink_request(gateway.uri(TH), body))


def test_seq_2_62_is_accepted_its_retry_is_a_duplicate_and_the_next_seq_goes_on(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("nbiot/#")
    huge = 2**62

    codes = [send(gateway, {"seq": s, "ts": 1_700_000_000, "temperature": 20.0}).code
             for s in (1, huge, huge, huge + 1)]

    assert codes == [aiocoap.CHANGED] * 4
    assert [m["seq"] for m in sub.wait_count(3)] == [1, huge, huge + 1]
    assert gateway.metric("nbiot_gateway_uplinks_duplicate_total") == 1
    assert gateway.metric("nbiot_gateway_uplinks_rejected_total", {"reason": "spool_error"}) == 0


def test_after_int64_max_a_lower_seq_is_stale_unless_its_clock_moved_on(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("nbiot/#")
    assert send(gateway, {"seq": 3, "ts": 1_700_000_000, "temperature": 20.0}).code == aiocoap.CHANGED
    assert send(gateway, {"seq": INT64_MAX, "ts": 1_700_000_010,
                          "temperature": 20.0}).code == aiocoap.CHANGED

    stale = send(gateway, {"seq": 4, "temperature": 20.0})
    stale_same_clock = send(gateway, {"seq": 4, "ts": 1_700_000_010, "temperature": 20.0})
    restarted = send(gateway, {"seq": 4, "ts": 1_700_000_020, "temperature": 20.0})
    next_after_restart = send(gateway, {"seq": 5, "ts": 1_700_000_030, "temperature": 20.0})

    assert (stale.code, stale_same_clock.code) == (aiocoap.BAD_REQUEST, aiocoap.BAD_REQUEST)
    assert b"newer ts" in stale.payload
    assert (restarted.code, next_after_restart.code) == (aiocoap.CHANGED, aiocoap.CHANGED)
    assert [m["seq"] for m in sub.wait_count(4)] == [3, INT64_MAX, 4, 5]


def test_jumps_of_2_30_to_2_40_are_answered_and_the_gateway_stays_responsive(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    """Before the fix a jump of 2^30-2^35 built a 128 MiB-4 GiB integer on the event loop,
    and ~2^36 raised MemoryError with the in-flight slot taken: every retry hung."""
    sub = subscribe("nbiot/#")
    seqs = [1] + [1 + 2**k for k in range(30, 41, 2)]

    codes = [send(gateway, {"seq": s, "temperature": 20.0}).code for s in seqs]
    other = DEVICES[1]
    with RawCoap(gateway.coap_port) as device:
        other_code = device.exchange(
            uplink_request(gateway.uri(other), {"seq": 1, "temperature": 20.0})).code

    assert codes == [aiocoap.CHANGED] * len(seqs)
    assert other_code == aiocoap.CHANGED
    assert [m["seq"] for m in sub.wait_count(len(seqs) + 1)
            if m["device_id"] == TH.device_id] == seqs


def test_a_seq_beyond_int64_is_refused_4_00_not_5_00(gateway: Gateway) -> None:
    reply = send(gateway, {"seq": 2**64, "temperature": 20.0})

    assert reply.code == aiocoap.BAD_REQUEST
    assert send(gateway, {"seq": 7, "temperature": 20.0}).code == aiocoap.CHANGED
