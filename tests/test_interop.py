"""Interop with two independent CoAP clients: aiocoap's (Python) and libcoap's `coap-client-notls`
(C). Each gets its 2.04 and the reading reaches MQTT; libcoap also drives Block1 and NON."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import cbor2
import pytest

from tests.conftest import DEVICES, Gateway, Subscription

TH, PM = DEVICES[0], DEVICES[2]
# libcoap at verbosity 7 logs each PDU as `v:1 t:ACK c:2.04 i:1a2b {01} [ Block1:2/_/64 ] ...`
PDU_LINE = re.compile(r"^v:1 t:(?P<type>CON|NON|ACK|RST) c:(?P<code>\d\.\d\d) .*?\[(?P<options>.*?)\]")


@dataclass
class LibcoapResult:
    """What coap-client-notls received: (type, code, options) of each response PDU."""

    responses: list[tuple[str, str, str]]
    output: str


def coap_client(tmp_path: Path, uri: str, payload: bytes, *args: str) -> LibcoapResult:
    binary = shutil.which("coap-client-notls")
    if binary is None:
        pytest.fail("coap-client-notls is not installed: run ./scripts/test (Debian libcoap3-bin)")
    payload_file = tmp_path / "payload.bin"
    payload_file.write_bytes(payload)
    done = subprocess.run(
        [binary, "-v", "7", "-B", "10", "-m", "post", "-f", str(payload_file), *args, uri],
        capture_output=True, text=True, timeout=30, check=False)
    output = done.stdout + done.stderr
    responses = [(m["type"], m["code"], m["options"].strip())
                 for m in map(PDU_LINE.match, output.splitlines()) if m]
    return LibcoapResult(responses, output)


async def test_aiocoap_client_gets_2_04_and_the_reading_arrives(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("nbiot/#")
    ctx = await aiocoap.Context.create_client_context()
    try:
        request = aiocoap.Message(code=aiocoap.POST, uri=gateway.uri(PM), content_format=60,
                                  payload=cbor2.dumps({"seq": 100, "voltage": 230.6}))
        response = await ctx.request(request).response
    finally:
        await ctx.shutdown()

    assert response.code == aiocoap.CHANGED
    (message,) = sub.wait_count(1)
    assert (message["device_id"], message["seq"]) == (PM.device_id, 100)
    assert message["readings"] == {"voltage": {"value": 230.6, "unit": "V"}}


async def test_aiocoap_client_block1_transfer_gets_2_04_and_the_reading_arrives(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("nbiot/#")
    body = json.dumps({"seq": 3, "temperature": 19.5}, indent=1000).encode()
    assert 1024 < len(body) <= 2048  # aiocoap sends over 1024 bytes as Block1: two blocks
    ctx = await aiocoap.Context.create_client_context()
    try:
        request = aiocoap.Message(code=aiocoap.POST, uri=gateway.uri(TH), payload=body,
                                  content_format=50)
        response = await ctx.request(request).response
    finally:
        await ctx.shutdown()

    assert response.code == aiocoap.CHANGED
    (message,) = sub.wait_count(1)
    assert message["readings"] == {"temperature": {"value": 19.5, "unit": "Cel"}}


def test_libcoap_client_gets_2_04_and_the_reading_arrives(
    gateway: Gateway, subscribe: Callable[[str], Subscription], tmp_path: Path
) -> None:
    sub = subscribe("nbiot/#")

    result = coap_client(tmp_path, gateway.uri(TH), b'{"seq": 1, "temperature": 22.5}', "-t", "50")

    assert [(t, c) for t, c, _ in result.responses] == [("ACK", "2.04")], result.output
    (message,) = sub.wait_count(1)
    assert (message["device_id"], message["seq"]) == (TH.device_id, 1)
    assert message["readings"] == {"temperature": {"value": 22.5, "unit": "Cel"}}


def test_libcoap_block1_transfer_in_64_byte_blocks_gets_2_04_and_arrives_whole(
    gateway: Gateway, subscribe: Callable[[str], Subscription], tmp_path: Path
) -> None:
    sub = subscribe("nbiot/#")
    body = json.dumps({"seq": 2, "temperature": 22.5, "humidity": 55.0}, indent=40).encode()
    assert 128 < len(body) <= 192  # three blocks

    result = coap_client(tmp_path, gateway.uri(TH), body, "-t", "50", "-b", "64")

    assert result.responses == [("ACK", "2.31", "Block1:0/M/64"), ("ACK", "2.31", "Block1:1/M/64"),
                                ("ACK", "2.04", "Block1:2/_/64")], result.output
    (message,) = sub.wait_count(1)
    assert message["readings"] == {"temperature": {"value": 22.5, "unit": "Cel"},
                                   "humidity": {"value": 55.0, "unit": "%RH"}}


def test_libcoap_block1_transfer_over_the_limit_gets_4_13(
    gateway: Gateway, tmp_path: Path
) -> None:
    body = b'{"seq": 3, "temperature": 22.5' + b" " * 5000 + b"}"

    result = coap_client(tmp_path, gateway.uri(TH), body, "-t", "50", "-b", "1024")

    assert [(t, c) for t, c, _ in result.responses] == [("ACK", "4.13")], result.output
    assert gateway.metric("nbiot_gateway_uplinks_rejected_total",
                          {"reason": "payload_too_large"}) == 1


def test_libcoap_non_request_gets_a_non_2_04(
    gateway: Gateway, subscribe: Callable[[str], Subscription], tmp_path: Path
) -> None:
    sub = subscribe("nbiot/#")

    result = coap_client(tmp_path, gateway.uri(TH), b'{"seq": 4, "temperature": 22.5}', "-t", "50",
                         "-N")

    assert [(t, c) for t, c, _ in result.responses] == [("NON", "2.04")], result.output
    (message,) = sub.wait_count(1)
    assert message["seq"] == 4


def test_libcoap_client_with_wrong_token_gets_4_01_with_diagnostic(
    gateway: Gateway, tmp_path: Path
) -> None:
    result = coap_client(tmp_path, gateway.uri(TH, "nope"), b'{"temperature": 22.5}', "-t", "50")

    assert [(t, c) for t, c, _ in result.responses] == [("ACK", "4.01")], result.output
    assert "wrong token" in result.output


async def test_token_with_percent_sign_matches_as_the_client_decoded_it(
    gateway_factory: Callable[..., Gateway],
) -> None:
    gateway = gateway_factory(start=False)
    with (gateway.workdir / "devices.csv").open("a") as registry:
        registry.write("pct-1,env_th,s3cr%41t,60,true\n")
    gateway.start()
    ctx = await aiocoap.Context.create_client_context()
    try:
        request = aiocoap.Message(code=aiocoap.POST, uri=gateway.uri("pct-1", "s3cr%2541t"),
                                  payload=b'{"temperature": 20.5}', content_format=50)
        response = await ctx.request(request).response
    finally:
        await ctx.shutdown()

    assert response.code == aiocoap.CHANGED, response.payload
