"""Device liveness end to end: online on an uplink, offline after missed intervals,
each change retained on MQTT, totals in nbiot_gateway_devices, state kept across restarts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import aiocoap

from tests.conftest import Gateway, Subscription, wait_for

FAST_LIVENESS = {
    "NBIOT_LIVENESS__CHECK_INTERVAL_S": "0.2",
    "NBIOT_LIVENESS__OFFLINE_AFTER_INTERVALS": "1",
}


def _registry(tmp_path: Path) -> Path:
    path = tmp_path / "fast-devices.csv"
    path.write_text("device_id,type,token,report_interval_s\n"
                    "fast-1,env_th,tok-1,1\n"
                    "slow-1,env_th,tok-2,3600\n"
                    "quiet-1,env_th,tok-3,60\n")
    return path


async def _post(gw: Gateway, device_id: str, token: str, seq: int) -> aiocoap.Message:
    ctx = await aiocoap.Context.create_client_context()
    try:
        request = aiocoap.Message(code=aiocoap.POST, uri=gw.uri(device_id, token),
                                  payload=json.dumps({"seq": seq, "temperature": 20}).encode())
        return await ctx.request(request).response
    finally:
        await ctx.shutdown()


def _states(gw: Gateway) -> dict[str, float]:
    return {s: gw.metric("nbiot_gateway_devices", {"state": s})
            for s in ("online", "offline", "never_seen")}


async def test_silent_device_goes_offline_and_state_changes_are_retained(
    gateway_factory: Callable[..., Gateway], subscribe: Callable[[str], Subscription],
    tmp_path: Path,
) -> None:
    gw = gateway_factory(NBIOT_REGISTRY__PATH=str(_registry(tmp_path)), **FAST_LIVENESS)
    sub = subscribe("nbiot/plant/+/+/status")
    assert _states(gw) == {"online": 0, "offline": 0, "never_seen": 3}

    assert (await _post(gw, "fast-1", "tok-1", 1)).code == aiocoap.CHANGED
    assert (await _post(gw, "slow-1", "tok-2", 1)).code == aiocoap.CHANGED

    statuses = sub.wait_count(3, "/status")  # fast-1 online, slow-1 online, fast-1 offline
    online = [m for m in statuses if m["state"] == "online"]
    assert sorted(m["device_id"] for m in online) == ["fast-1", "slow-1"]
    offline = [m for m in statuses if m["state"] == "offline"]
    assert [m["device_id"] for m in offline] == ["fast-1"]
    assert "no uplink for" in offline[0]["reason"]
    wait_for(lambda: _states(gw) == {"online": 1, "offline": 1, "never_seen": 1},
             what="gauges online=1 offline=1 never_seen=1")
    assert gw.metric("nbiot_gateway_device_state_changes_total", {"state": "offline"}) == 1

    # The status is retained: a new subscriber sees the last state of each device at once.
    late = subscribe("nbiot/plant/env_th/+/status")
    retained = wait_for(lambda: {m["device_id"]: m["state"] for m in late.messages("/status")}
                        if len(late.messages("/status")) >= 2 else None, what="retained statuses")
    assert retained == {"fast-1": "offline", "slow-1": "online"}


async def test_last_seen_table_survives_a_restart(
    gateway_factory: Callable[..., Gateway], tmp_path: Path,
) -> None:
    gw = gateway_factory(NBIOT_REGISTRY__PATH=str(_registry(tmp_path)),
                         NBIOT_LIVENESS__CHECK_INTERVAL_S="0.2")
    assert (await _post(gw, "slow-1", "tok-2", 1)).code == aiocoap.CHANGED
    wait_for(lambda: _states(gw)["online"] == 1, what="slow-1 online")
    assert gw.stop() == 0

    gw.start()

    assert _states(gw) == {"online": 1, "offline": 0, "never_seen": 2}
