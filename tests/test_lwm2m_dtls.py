"""LwM2M over coaps (DTLS-PSK, the PSK identity is the endpoint name), against clients we
did not write: libcoap's `coap-client-openssl` (OpenSSL's DTLS) for raw Register and
Send, and aiocoap's tinydtls client as a device that also answers a command."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
from collections.abc import Callable

import aiocoap
import aiocoap.resource
import pytest

from tests.conftest import DEVICES, Broker, Gateway, Subscription, free_port, wait_for
from tests.test_dtls import KEYS, DtlsGateway, coaps_toml

TH1, TH2 = DEVICES[0], DEVICES[1]
OBJECTS = '</>;rt="oma.lwm2m",</1/0>,</3303/0>'


def openssl_client(uri: str, identity: str, key: bytes, payload: str, content_format: int,
                   *args: str) -> str:
    binary = shutil.which("coap-client-openssl")
    if binary is None:
        pytest.fail("coap-client-openssl is not installed: run ./scripts/test (libcoap3-bin)")
    done = subprocess.run(
        [binary, "-v", "7", "-B", "3", "-m", "post", "-t", str(content_format),
         "-u", identity, "-k", key.decode(), "-e", payload, *args, uri],
        capture_output=True, text=True, timeout=60, check=False)
    return done.stdout + done.stderr


@pytest.fixture
def lwm2m_dtls(gateway_factory: Callable[..., Gateway]) -> DtlsGateway:
    port = free_port(socket.SOCK_DGRAM)
    # allow_nosec stays off: over coaps the handshake is the credential
    gateway = gateway_factory(coaps_toml(port) + "[lwm2m]\nenabled = true\nawake_s = 5.0\n",
                              start=False)
    made = DtlsGateway(gateway, port)
    made.write_registry(KEYS)
    gateway.start()
    return made


def test_register_and_send_over_coaps_with_coap_client_openssl(
        lwm2m_dtls: DtlsGateway, subscribe: Callable[[str], Subscription]) -> None:
    sub = subscribe("nbiot/#")
    base = f"coaps://127.0.0.1:{lwm2m_dtls.coaps_port}"
    out = openssl_client(f"{base}/rd?ep={TH1.device_id}&lt=300&lwm2m=1.1&b=UQ",
                         TH1.device_id, KEYS[TH1.device_id], OBJECTS, 40)
    assert "c:2.01" in out and "Location-Path:rd, Location-Path:th-1" in out, out
    # a new handshake from a new port: the identity, not the address, names the device
    out = openssl_client(f"{base}/dp", TH1.device_id, KEYS[TH1.device_id],
                         json.dumps([{"n": "/3303/0/5700", "v": 22.5, "t": 1_796_000_300}]), 110)
    assert "c:2.04" in out, out
    (message,) = sub.wait_count(1)
    assert message["transport"] == "lwm2m+coaps"
    assert message["readings"]["temperature"]["value"] == 22.5
    # another device's key cannot register as th-1, nor Send as it
    out = openssl_client(f"{base}/rd?ep={TH1.device_id}&lt=300", TH2.device_id,
                         KEYS[TH2.device_id], OBJECTS, 40)
    assert "c:4.03" in out and "DTLS identity is another endpoint" in out, out
    out = openssl_client(f"{base}/dp", TH2.device_id, KEYS[TH2.device_id],
                         json.dumps([{"n": "/3303/0/5700", "v": 1}]), 110)
    assert "c:4.03" in out, out  # th-2 never registered
    assert lwm2m_dtls.gateway.metric("nbiot_gateway_uplinks_rejected_total",
                                     {"reason": "identity_mismatch"}) == 1


class Period(aiocoap.resource.Resource):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.value = b"60"

    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        self.value = request.payload
        return aiocoap.Message(code=aiocoap.CHANGED)

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CONTENT, payload=self.value, content_format=0)


async def test_a_command_reaches_a_device_over_its_dtls_session(
        lwm2m_dtls: DtlsGateway, broker: Broker,
        subscribe: Callable[[str], Subscription]) -> None:
    acks = subscribe(f"nbiot/plant/env_th/{TH1.device_id}/down/ack")
    site = aiocoap.resource.Site()
    period = Period()
    site.add_resource(["1", "0", "3"], period)
    ctx = await aiocoap.Context.create_client_context(transports=["tinydtls"])
    ctx.serversite = site  # the device answers the gateway's requests on its session
    base = f"coaps://127.0.0.1:{lwm2m_dtls.coaps_port}"
    ctx.client_credentials.load_from_dict({f"{base}/*": {"dtls": {
        "psk": {"hex": KEYS[TH1.device_id].hex()},
        "client-identity": {"ascii": TH1.device_id}}}})
    try:
        register = aiocoap.Message(code=aiocoap.POST, payload=OBJECTS.encode(),
                                   uri=f"{base}/rd?ep={TH1.device_id}&lt=300&lwm2m=1.1&b=UQ",
                                   content_format=40)
        reply = await ctx.request(register).response
        assert reply.code == aiocoap.CREATED, reply.payload
        await asyncio.to_thread(subprocess.run, [
            "mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-t",
            f"nbiot/plant/env_th/{TH1.device_id}/down", "-m",
            json.dumps({"id": "p1", "op": "write", "path": "/1/0/3", "value": 15})],
            check=True, timeout=10)
        await asyncio.to_thread(wait_for, lambda: any(
            m["state"] == "confirmed" for m in acks.messages("/down/ack")))
    finally:
        await ctx.shutdown()
    assert period.value == b"15"
    confirmed = next(m for m in acks.messages("/down/ack") if m["state"] == "confirmed")
    assert confirmed["result"] == {"code": "2.04"}
