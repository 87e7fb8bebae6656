"""Every way an uplink can be refused: the CoAP code and diagnostic the device gets, the reason
it is counted under, and the dead letter an operator sees. Malformed datagrams are counted and
never stop the service; a full spool answers 5.03 with Max-Age."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import aiocoap
import cbor2
import pytest
from aiocoap.optiontypes import BlockOption

from tests.coap_raw import RawCoap, uplink_request
from tests.conftest import DEVICES, Broker, Gateway, Subscription, wait_for

TH = DEVICES[0]  # th-1, env_th: temperature (required, Cel, -40..85), humidity (%RH, 0..100)
DISABLED = next(d for d in DEVICES if d.device_id == "off-1")
REJECTED = "nbiot_gateway_uplinks_rejected_total"
MALFORMED = "nbiot_gateway_malformed_datagrams_total"
VALID = {"temperature": 21.5}


@dataclass(frozen=True)
class Refusal:
    """A request the gateway must refuse, and how."""

    build: Callable[[Gateway], aiocoap.Message]
    code: aiocoap.Code
    diagnostic: str
    reason: str


def json_uplink(payload: bytes | dict[str, object], **kw: object) -> Callable[[Gateway], aiocoap.Message]:
    return lambda gw: uplink_request(gw.uri(TH), payload, **kw)  # type: ignore[arg-type]


def block1_announcing(size1: int) -> Callable[[Gateway], aiocoap.Message]:
    def build(gw: Gateway) -> aiocoap.Message:
        request = uplink_request(gw.uri(TH), b" " * 1024)
        request.opt.block1 = BlockOption.BlockwiseTuple(0, True, 6)
        request.opt.size1 = size1
        return request
    return build


REFUSALS = {
    "unknown-path": Refusal(
        lambda gw: uplink_request(f"coap://127.0.0.1:{gw.coap_port}/data/th-1?k={TH.token}", VALID),
        aiocoap.NOT_FOUND, "POST to /up/{device_id}?k={token}", "unknown_path"),
    "wrong-method": Refusal(
        lambda gw: uplink_request(gw.uri(TH), b"", code=aiocoap.GET, content_format=None),
        aiocoap.METHOD_NOT_ALLOWED, "use POST or PUT", "method_not_allowed"),
    "unknown-device": Refusal(
        lambda gw: uplink_request(gw.uri("nope-1", "tok"), VALID),
        aiocoap.NOT_FOUND, "unknown device", "unknown_device"),
    "wrong-token": Refusal(
        lambda gw: uplink_request(gw.uri(TH, "tok-th-2"), VALID),
        aiocoap.UNAUTHORIZED, "wrong token", "bad_token"),
    "missing-token": Refusal(
        lambda gw: uplink_request(gw.uri(TH.device_id), VALID),
        aiocoap.UNAUTHORIZED, "token k= missing", "missing_token"),
    "disabled-device": Refusal(
        lambda gw: uplink_request(gw.uri(DISABLED), VALID),
        aiocoap.FORBIDDEN, "device disabled", "device_disabled"),
    "unparsable-json": Refusal(
        json_uplink(b'{"temperature": 21.'), aiocoap.BAD_REQUEST, "invalid JSON", "bad_payload"),
    "unparsable-cbor": Refusal(
        json_uplink(b"\xa1\x6btemperature", content_format=60),
        aiocoap.BAD_REQUEST, "invalid CBOR", "bad_payload"),
    "not-a-map": Refusal(
        json_uplink(b"[21.5]"), aiocoap.BAD_REQUEST, "JSON: expected a map", "bad_payload"),
    "unknown-field": Refusal(
        json_uplink({"temperature": 21.5, "pressure": 1013}),
        aiocoap.BAD_REQUEST, "pressure: Extra inputs are not permitted", "unknown_field"),
    "out-of-range": Refusal(
        json_uplink({"temperature": 85.5}),
        aiocoap.BAD_REQUEST, "temperature: Input should be less than or equal to 85",
        "out_of_range"),
    "device-time-in-milliseconds": Refusal(
        json_uplink({"ts": 1763900000000, "temperature": 21.5}),
        aiocoap.BAD_REQUEST, "ts: Input should be less than or equal to", "out_of_range"),
    "wrong-type": Refusal(
        json_uplink({"temperature": "21.5"}),
        aiocoap.BAD_REQUEST, "temperature: Input should be a valid number", "wrong_type"),
    "missing-field": Refusal(
        json_uplink({"humidity": 40.0}), aiocoap.BAD_REQUEST, "temperature: Field required",
        "missing_field"),
    "wrong-unit": Refusal(
        json_uplink(cbor2.dumps([{0: "temperature", 1: "K", 2: 294.5}]), content_format=112),
        aiocoap.BAD_REQUEST, "temperature: unit 'K', expected 'Cel'", "wrong_unit"),
    "unsupported-content-format": Refusal(
        json_uplink(b"21.5", content_format=0),
        aiocoap.UNSUPPORTED_CONTENT_FORMAT, "use content-format 50, 60, 110 or 112",
        "unsupported_content_format"),
    "too-large": Refusal(
        json_uplink(b'{"temperature": 21.5' + b" " * 4096 + b"}"),
        aiocoap.REQUEST_ENTITY_TOO_LARGE, "max 4096 bytes", "payload_too_large"),
    "block1-announcing-too-large": Refusal(
        block1_announcing(4097),
        aiocoap.REQUEST_ENTITY_TOO_LARGE, "max 4096 bytes", "payload_too_large"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_uplink_gets_code_diagnostic_counted_reason_and_dead_letter(
    gateway: Gateway, subscribe: Callable[[str], Subscription], case: str
) -> None:
    refusal = REFUSALS[case]
    sub = subscribe("nbiot/#")
    request = refusal.build(gateway)

    with RawCoap(gateway.coap_port) as device:
        reply = device.exchange(request)

    assert (reply.mtype, reply.mid) == (aiocoap.ACK, request.mid)
    assert reply.code == refusal.code
    assert reply.payload.decode().startswith(refusal.diagnostic)
    assert gateway.metric(REJECTED, {"reason": refusal.reason}) == 1
    assert gateway.metric("nbiot_gateway_uplinks_received_total") == 1
    (dead_letter,) = sub.wait_count(1, "/invalid")
    assert dead_letter["reason"] == refusal.reason
    assert dead_letter["code"] == str(refusal.code.dotted)
    assert base64.b64decode(dead_letter["payload_b64"]) == request.payload
    assert sub.messages("/up") == []


def test_too_large_reply_tells_the_limit_in_size1(gateway: Gateway) -> None:
    request = uplink_request(gateway.uri(TH), b"{" + b" " * 5000 + b"}")

    with RawCoap(gateway.coap_port) as device:
        reply = device.exchange(request)

    assert (reply.code, reply.opt.size1) == (aiocoap.REQUEST_ENTITY_TOO_LARGE, 4096)


def test_block1_transfer_growing_past_the_limit_gets_4_13(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("nbiot/#")
    codes = []
    with RawCoap(gateway.coap_port) as device:
        for num in range(8):  # 8 KiB in 1 KiB blocks, no Size1: the limit is found on the way
            request = uplink_request(gateway.uri(TH), b" " * 1024)
            request.opt.block1 = BlockOption.BlockwiseTuple(num, True, 6)
            reply = device.exchange(request)
            codes.append(reply.code)
            if reply.code != aiocoap.CONTINUE:
                break

    assert codes == [aiocoap.CONTINUE] * 4 + [aiocoap.REQUEST_ENTITY_TOO_LARGE]
    assert reply.payload == b"max 4096 bytes"
    assert gateway.metric(REJECTED, {"reason": "payload_too_large"}) == 1
    (dead_letter,) = sub.wait_count(1, "/invalid")
    assert dead_letter["reason"] == "payload_too_large"


def test_block1_with_reserved_block_size_gets_4_00(gateway: Gateway) -> None:
    request = uplink_request(gateway.uri(TH), b" " * 2048)
    request.opt.block1 = BlockOption.BlockwiseTuple(0, True, 7)  # SZX 7: reserved (RFC 7959 2.2)

    with RawCoap(gateway.coap_port) as device:
        reply = device.exchange(request)

    assert reply.code == aiocoap.BAD_REQUEST
    assert gateway.metric(REJECTED, {"reason": "bad_block"}) == 1


def test_unknown_critical_option_gets_4_02_and_is_counted(gateway: Gateway) -> None:
    request = uplink_request(gateway.uri(TH), VALID)
    request.opt.add_option(aiocoap.optiontypes.OpaqueOption(
        aiocoap.OptionNumber(65001), b"x"))  # odd: critical, and unknown to the gateway

    with RawCoap(gateway.coap_port) as device:
        reply = device.exchange(request)

    assert (reply.code, reply.payload) == (aiocoap.BAD_OPTION, b"critical option 65001")
    assert gateway.metric(REJECTED, {"reason": "bad_option"}) == 1


def test_block1_option_longer_than_three_bytes_gets_4_02(gateway: Gateway) -> None:
    request = uplink_request(gateway.uri(TH), VALID)
    request.opt.add_option(aiocoap.optiontypes.OpaqueOption(
        aiocoap.OptionNumber.BLOCK1, b"\x00\x00\x00\x0e"))  # RFC 7959: 0-3 bytes

    with RawCoap(gateway.coap_port) as device:
        reply = device.exchange(request)

    assert reply.code == aiocoap.BAD_OPTION
    assert gateway.metric(REJECTED, {"reason": "bad_option"}) == 1


def test_long_diagnostic_is_cut_on_a_utf8_character_boundary(gateway: Gateway) -> None:
    request = uplink_request(gateway.uri(TH), {"temperature": 21.5, "x" + "温度" * 40: 1.0})

    with RawCoap(gateway.coap_port) as device:
        reply = device.exchange(request)

    assert reply.code == aiocoap.BAD_REQUEST
    assert reply.payload.decode("utf-8").startswith("x温度")


# -- malformed datagrams ----------------------------------------------------------------------
MALFORMED_DATAGRAMS = {
    "dtls-record": bytes.fromhex("16fefd0000000000000000002d"),  # coaps sent to the coap port
    "http-request": b"GET / HTTP/1.1\r\n\r\n",
    "truncated-header": b"\x40\x02\x12",
    "bad-version": b"\x80\x02\x12\x34",
    "token-length-over-8": b"\x49\x02\x12\x34" + b"t" * 9,
    "truncated-token": b"\x44\x02\x12\x34tok",
    "option-runs-past-end": b"\x40\x02\x12\x34\xb5up",
    "reserved-option-delta": b"\x40\x02\x12\x34\xf1x",
    "payload-marker-without-payload": b"\x40\x02\x12\x34\xff",
    "empty-message-with-token": b"\x41\x00\x12\x34t",
}


def test_malformed_datagrams_are_counted_and_valid_uplinks_still_answered(
    gateway: Gateway,
) -> None:
    datagrams = list(MALFORMED_DATAGRAMS.values())
    with RawCoap(gateway.coap_port) as device:
        for data in datagrams:
            device.send(data)
        wait_for(lambda: gateway.metric(MALFORMED) == len(datagrams), what="malformed counted")
        reply = device.exchange(uplink_request(gateway.uri(TH), VALID))

    assert reply.code == aiocoap.CHANGED
    assert gateway.metric(MALFORMED) == len(datagrams)
    assert gateway.proc is not None and gateway.proc.poll() is None


def test_con_with_malformed_options_gets_rst_with_its_message_id(gateway: Gateway) -> None:
    malformed_cons = {
        0x1001: b"\x40\x02\x10\x01\xf1x",  # option delta 15 is reserved
        0x1002: b"\x40\x02\x10\x02\x1f",  # option length 15 is reserved
        0x1003: b"\x40\x02\x10\x03\xb5up",  # option value runs past the datagram
        0x1004: b"\x40\x02\x10\x04\xd0",  # extended option delta missing
    }
    with RawCoap(gateway.coap_port) as device:
        replies = {}
        for mid, data in malformed_cons.items():
            device.send(data)
            reply = device.receive()
            replies[mid] = (reply.mtype, reply.code, reply.mid)

    assert replies == {mid: (aiocoap.RST, aiocoap.EMPTY, mid) for mid in malformed_cons}
    assert gateway.metric(MALFORMED) == len(malformed_cons)


def test_empty_con_ping_gets_rst(gateway: Gateway) -> None:
    with RawCoap(gateway.coap_port) as device:
        device.send(b"\x40\x00\xbe\xef")
        reply = device.receive()

    assert (reply.mtype, reply.code, reply.mid) == (aiocoap.RST, aiocoap.EMPTY, 0xBEEF)


# -- spool full ---------------------------------------------------------------------------------
def test_full_spool_answers_5_03_with_max_age(
    broker: Broker, gateway_factory: Callable[..., Gateway]
) -> None:
    broker.stop()  # nothing drains the spool
    gateway = gateway_factory(NBIOT_SPOOL__MAX_BYTES="2048")
    codes = []
    with RawCoap(gateway.coap_port) as device:
        for seq in range(30):
            reply = device.exchange(uplink_request(gateway.uri(TH), {"seq": seq, **VALID}))
            codes.append(reply.code)
            if reply.code != aiocoap.CHANGED:
                break

    assert codes[:-1] and set(codes[:-1]) == {aiocoap.CHANGED}
    assert codes[-1] == aiocoap.SERVICE_UNAVAILABLE
    assert reply.opt.max_age == 30
    assert reply.payload == b"spool full, retry later"
    assert gateway.metric(REJECTED, {"reason": "spool_full"}) == 1
    assert gateway.metric("nbiot_gateway_uplinks_accepted_total") == len(codes) - 1
    with pytest.raises(urllib.error.HTTPError) as not_ready:
        urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/readyz", timeout=5)
    assert not_ready.value.code == 503
    assert not_ready.value.read() == b"spool full: uplinks get 5.03\n"


def test_dead_letters_leave_spool_space_for_valid_uplinks(
    broker: Broker, gateway_factory: Callable[..., Gateway]
) -> None:
    broker.stop()  # nothing drains the spool
    gateway = gateway_factory(NBIOT_SPOOL__MAX_BYTES="16384")
    with RawCoap(gateway.coap_port) as device:
        for _ in range(60):  # ~400 bytes of dead letter each: more than the spool holds
            device.exchange(uplink_request(gateway.uri(TH), b"garbage " * 20))
        replies = [device.exchange(uplink_request(gateway.uri(TH), {"seq": seq, **VALID}))
                   for seq in range(3)]

    assert gateway.metric("nbiot_gateway_dead_letters_dropped_total") > 0
    assert [r.code for r in replies] == [aiocoap.CHANGED] * 3


def test_dead_letter_names_the_device_and_keeps_raw_bytes(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("nbiot/#")
    raw = b"\x00\xffnot json\x80"

    with RawCoap(gateway.coap_port) as device:
        device.exchange(uplink_request(gateway.uri(TH), raw))

    ((topic, body),) = wait_for(
        lambda: [(t, p) for t, p in sub.lines() if t.endswith("/invalid")], what="dead letter")
    dead_letter = json.loads(body)
    assert topic == "nbiot/plant/invalid"
    assert dead_letter["device_id"] == TH.device_id
    assert dead_letter["device_known"] is True
    assert dead_letter["content_format"] == 50
    assert base64.b64decode(dead_letter["payload_b64"]) == raw


def test_overlong_content_format_option_is_ignored_not_an_internal_error(gateway: Gateway) -> None:
    # RFC 7252 5.4.3: an elective option longer than its format allows is ignored; a
    # 2,000-byte value must not become a 4,800-digit number somewhere inside the gateway.
    # (aiocoap will not encode such an option, so this one datagram is built by hand.)
    from gateway.ingest.coap import wire

    options = [(11, b"up"), (11, TH.device_id.encode()), (12, b"\x01" * 2000),
               (15, f"k={TH.token}".encode())]
    datagram = wire.encode(wire.Message(0, 2, 777, b"\x07", options,
                                        b'{"seq": 1, "temperature": 20.0}'))

    with RawCoap(gateway.coap_port) as device:
        device.send(datagram)
        reply = device.receive()

    assert reply.code == aiocoap.CHANGED  # read as JSON, the default
    assert gateway.metric("nbiot_gateway_uplinks_rejected_total", {"reason": "internal_error"}) == 0


def test_block1_out_of_order_gets_4_08_counted_and_kept(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("nbiot/plant/invalid")
    with RawCoap(gateway.coap_port) as device:
        first = uplink_request(gateway.uri(TH), b" " * 64)
        first.opt.block1 = BlockOption.BlockwiseTuple(0, True, 2)
        assert device.exchange(first).code == aiocoap.CONTINUE
        skipped = uplink_request(gateway.uri(TH), b" " * 64)
        skipped.opt.block1 = BlockOption.BlockwiseTuple(2, True, 2)  # block 1 never came
        reply = device.exchange(skipped)

    assert reply.code == aiocoap.REQUEST_ENTITY_INCOMPLETE
    assert reply.payload == b"block out of order; restart at block 0"
    assert gateway.metric(REJECTED, {"reason": "block_out_of_order"}) == 1
    (dead,) = sub.wait_count(1, "/invalid")
    assert (dead["reason"], dead["code"]) == ("block_out_of_order", "4.08")
