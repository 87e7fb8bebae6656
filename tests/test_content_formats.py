"""Each Content-Format, by POST and by PUT, from aiocoap's client through the gateway to a real
mosquitto: the MQTT message carries the same readings, with units, seq and device time."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import aiocoap
import cbor2
import pytest

from tests.conftest import DEVICES, Gateway, Subscription

DEVICE = DEVICES[0]  # th-1, type env_th
FLAT = {"seq": 17, "ts": 1763900000, "temperature": 21.5, "humidity": 40.25}
SENML = [
    {"bn": f"urn:dev:{DEVICE.device_id}:", "bt": 1763900000, "n": "temperature", "u": "Cel",
     "v": 21.5},
    {"n": "humidity", "u": "%RH", "v": 40.25},
    {"n": "seq", "v": 17},
]
SENML_CBOR_LABELS = {"bn": -2, "bt": -3, "n": 0, "u": 1, "v": 2}
SENML_CBOR = [{SENML_CBOR_LABELS[k]: v for k, v in record.items()} for record in SENML]

PAYLOADS: dict[str, tuple[int | None, bytes]] = {
    "json": (50, json.dumps(FLAT).encode()),
    "json-by-default": (None, json.dumps(FLAT).encode()),
    "cbor": (60, cbor2.dumps(FLAT)),
    "senml-json": (110, json.dumps(SENML).encode()),
    "senml-cbor": (112, cbor2.dumps(SENML_CBOR)),
}


async def post(gateway: Gateway, method: aiocoap.Code, content_format: int | None,
               payload: bytes) -> aiocoap.Message:
    ctx = await aiocoap.Context.create_client_context()
    try:
        request = aiocoap.Message(code=method, uri=gateway.uri(DEVICE), payload=payload)
        if content_format is not None:
            request.opt.content_format = content_format
        return await ctx.request(request).response
    finally:
        await ctx.shutdown()


@pytest.mark.parametrize("method", [aiocoap.POST, aiocoap.PUT], ids=["POST", "PUT"])
@pytest.mark.parametrize("form", sorted(PAYLOADS))
async def test_each_content_format_reaches_mqtt_with_readings_and_units(
    gateway: Gateway, subscribe: Callable[[str], Subscription], form: str, method: aiocoap.Code
) -> None:
    sub = subscribe("nbiot/#")
    content_format, payload = PAYLOADS[form]

    response = await post(gateway, method, content_format, payload)

    assert (response.code, response.payload) == (aiocoap.CHANGED, b"")
    sub.wait_count(1)
    ((topic, body),) = [(t, json.loads(p)) for t, p in sub.lines() if t.endswith("/up")]
    assert topic == f"nbiot/plant/env_th/{DEVICE.device_id}/up"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body.pop("received_at"))
    assert body == {
        "device_id": DEVICE.device_id,
        "device_type": "env_th",
        "tenant": "plant",
        "gateway_id": "gw-test",
        "seq": 17,
        "device_time": "2025-11-23T12:13:20.000Z",
        "readings": {"temperature": {"value": 21.5, "unit": "Cel"},
                     "humidity": {"value": 40.25, "unit": "%RH"}},
        "transport": "coap",
    }


async def test_uplink_without_seq_and_ts_is_published_without_device_time(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("nbiot/#")

    response = await post(gateway, aiocoap.POST, 60, cbor2.dumps({"temperature": -3}))

    assert response.code == aiocoap.CHANGED
    (message,) = sub.wait_count(1)
    assert message["seq"] is None
    assert "device_time" not in message
    assert message["readings"] == {"temperature": {"value": -3.0, "unit": "Cel"}}
