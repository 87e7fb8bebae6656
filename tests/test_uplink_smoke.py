"""The shortest end-to-end path: one CoAP POST from aiocoap's client reaches MQTT."""

from __future__ import annotations

import json
from collections.abc import Callable

import aiocoap

from tests.conftest import DEVICES, Gateway, Subscription


async def test_json_uplink_reaches_mqtt_with_units(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("nbiot/#")
    device = DEVICES[0]
    ctx = await aiocoap.Context.create_client_context()
    try:
        request = aiocoap.Message(
            code=aiocoap.POST, uri=gateway.uri(device),
            payload=json.dumps({"seq": 7, "ts": 1763900000, "temperature": 21.5}).encode(),
            content_format=50)
        response = await ctx.request(request).response
    finally:
        await ctx.shutdown()

    assert response.code == aiocoap.CHANGED
    (message,) = sub.wait_count(1)
    assert message["device_id"] == device.device_id
    assert message["device_type"] == "env_th"
    assert message["seq"] == 7
    assert message["device_time"] == "2025-11-23T12:13:20.000Z"
    assert message["readings"] == {"temperature": {"value": 21.5, "unit": "Cel"}}
    assert message["gateway_id"] == "gw-test"
