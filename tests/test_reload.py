"""SIGHUP reloads the registry and device types without a restart: new devices are
accepted, a broken file keeps the old registry (and says why), traffic never stops."""

from __future__ import annotations

import signal
from collections.abc import Callable

import aiocoap

from tests.coap_raw import RawCoap, uplink_request
from tests.conftest import DEVICES, Gateway, Subscription, wait_for

TH = DEVICES[0]


def registry_rows(gateway: Gateway) -> str:
    return (gateway.workdir / "devices.csv").read_text()


def reload_and_wait(gateway: Gateway, log_marker: str) -> None:
    seen = gateway.log_path.read_text().count(log_marker)
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: gateway.log_path.read_text().count(log_marker) > seen,
             what=f"log line {log_marker!r}")


def post(gateway: Gateway, device_id: str, token: str, seq: int) -> aiocoap.Message:
    with RawCoap(gateway.coap_port) as device:
        return device.exchange(uplink_request(gateway.uri(device_id, token),
                                              {"seq": seq, "temperature": 20.0}))


def test_sighup_adds_a_new_device_without_a_restart(gateway: Gateway) -> None:
    assert post(gateway, "new-1", "tok-new", 1).code == aiocoap.NOT_FOUND
    (gateway.workdir / "devices.csv").write_text(
        registry_rows(gateway) + "new-1,env_th,tok-new,60,true\n")
    pid_before = gateway.proc.pid if gateway.proc else None

    reload_and_wait(gateway, "reloaded registry")

    assert post(gateway, "new-1", "tok-new", 2).code == aiocoap.CHANGED
    assert gateway.proc is not None and gateway.proc.pid == pid_before
    assert gateway.metric("nbiot_gateway_registry_devices") == len(DEVICES) + 1


def test_broken_registry_on_sighup_keeps_the_old_one_and_says_why(gateway: Gateway) -> None:
    (gateway.workdir / "devices.csv").write_text(
        registry_rows(gateway) + "broken-row,no_such_type,tok,60,true\n")

    reload_and_wait(gateway, "reload failed")

    assert post(gateway, TH.device_id, TH.token, 1).code == aiocoap.CHANGED
    assert "no_such_type" in gateway.log_path.read_text()
    assert gateway.metric("nbiot_gateway_registry_devices") == len(DEVICES)


def test_uplinks_sent_across_reloads_are_all_answered(
    gateway_factory: Callable[..., Gateway],
) -> None:
    gateway = gateway_factory()
    assert gateway.proc is not None
    codes = []
    with RawCoap(gateway.coap_port) as device:
        for seq in range(1, 61):
            if seq % 10 == 0:
                gateway.proc.send_signal(signal.SIGHUP)
            codes.append(device.exchange(uplink_request(
                gateway.uri(TH), {"seq": seq, "temperature": 20.0})).code)

    assert codes == [aiocoap.CHANGED] * 60


def test_sighup_applies_registry_and_types_only_and_names_what_waits_for_a_restart(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    """A tenant changed in the file would move message bodies but not topics if applied
    live: it waits for the restart, and the log says so."""
    sub = subscribe("nbiot/#")
    config = gateway.config_path.read_text()
    gateway.config_path.write_text(config.replace('tenant = "plant"', 'tenant = "other"'))
    (gateway.workdir / "devices.csv").write_text(
        registry_rows(gateway) + "new-2,env_th,tok-new2,60,true\n")

    reload_and_wait(gateway, "reloaded registry")

    assert post(gateway, "new-2", "tok-new2", 1).code == aiocoap.CHANGED
    [message] = sub.wait_count(1)
    assert message["tenant"] == "plant"
    assert sub.lines()[-1][0].startswith("nbiot/plant/")
    assert "changed [gateway] in" in gateway.log_path.read_text()
