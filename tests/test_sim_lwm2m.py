"""The simulator's LwM2M devices: their Send payloads decode as the gateway decodes them,
and end to end against the real gateway and mosquitto: a mixed fleet loses nothing, and
the plant's parameter tuning works through MQTT (a Write of /1/0/3, the reporting interval,
is confirmed with 2.04 and the device then reports at the new pace)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

from gateway.config import Settings, load_config
from gateway.ingest.lwm2m import content
from gateway.pipeline.registry import Registry, load_registry
from gateway.tools.sim.lwm2m import Lwm2mType, encode_send
from gateway.tools.sim.registry_file import make_registry
from tests.conftest import Broker, Gateway, Subscription
from tests.test_downlink import publish_command
from tests.test_sim_e2e import run_fleet

LWM2M_TOML = "[lwm2m]\nenabled = true\nallow_nosec = true\n"
IPSO = {"temperature": "/3303/0/5700", "humidity": "/3304/0/5700"}


def test_send_payloads_decode_to_the_mapped_resources_at_the_reading_time() -> None:
    kind = Lwm2mType.of(IPSO)
    values = {"temperature": 21.37, "humidity": 45.5}

    for cf in (content.SENML_CBOR, content.SENML_JSON):
        readings = content.decode(encode_send(kind, cf, 1_763_900_000_123, values), cf, (), 0.0)

        assert [(r.path, r.value) for r in readings] == [((3303, 0, 5700), 21.37),
                                                         ((3304, 0, 5700), 45.5)], cf
        # The gateway's seq for the reading: round(time * 1000), the simulator's key.
        assert {round((r.time or 0) * 1000) for r in readings} == {1_763_900_000_123}
    assert kind.links == b"</1/0>,</3/0>,</3303/0>,</3304/0>"


def lwm2m_gateway(gateway_factory: Callable[..., Gateway], devices: int, *, types: tuple[str, ...]
                  ) -> tuple[Gateway, Settings, Registry]:
    gw = gateway_factory(LWM2M_TOML, start=False)
    registry_path = gw.workdir / "devices.csv"
    registry_path.unlink()
    settings = load_config(gw.config_path)
    make_registry(registry_path, devices, types, report_interval_s=2)
    gw.start()
    return gw, settings, load_registry(registry_path, settings.types)


async def test_mixed_fleet_of_up_and_lwm2m_devices_loses_nothing(
    gateway_factory: Callable[..., Gateway],
) -> None:
    gw, settings, registry = lwm2m_gateway(gateway_factory, 100,
                                           types=("env_th", "power_meter"))

    summary = await run_fleet(settings, registry, devices=100, lwm2m_share=0.3, faulty_share=0.0,
                              nat_rebind_probability=0.3, loss_up=0.02, loss_down=0.02)

    assert summary.lwm2m_devices == 30
    assert summary.lwm2m_registers >= 30 and summary.lwm2m_sent > 30
    assert summary.lost == summary.lwm2m_lost == 0
    assert summary.lwm2m_delivered >= summary.lwm2m_acked > 0
    assert summary.duplicates_delivered == summary.delivered_rejected == 0
    assert summary.foreign_delivered == 0
    # A Send from a port the gateway did not know is refused, and taken after an Update.
    assert summary.rejected_by_code == {}
    # A 1.1 device Sends: the gateway observes only 1.0 registrations.
    assert "observe 2.05" not in summary.lwm2m_requests
    assert gw.metric("nbiot_gateway_lwm2m_registrations") == 30


async def test_write_of_the_reporting_interval_through_mqtt_is_confirmed_and_applied(
    gateway_factory: Callable[..., Gateway], broker: Broker,
    subscribe: Callable[[str], Subscription],
) -> None:
    _, settings, registry = lwm2m_gateway(gateway_factory, 4, types=("env_th",))
    tuned, read = list(registry)[:2]
    tuned_acks = subscribe(f"nbiot/plant/env_th/{tuned.device_id}/down/ack")
    read_acks = subscribe(f"nbiot/plant/env_th/{read.device_id}/down/ack")
    uplinks = subscribe("nbiot/plant/+/+/up")
    publish_command(broker, {"id": "faster", "ttl_s": 600, "op": "write", "path": "/1/0/3",
                             "value": 1}, topic=f"nbiot/plant/env_th/{tuned.device_id}/down")
    publish_command(broker, {"id": "what-interval", "op": "read", "path": "/1/0/3"},
                    topic=f"nbiot/plant/env_th/{read.device_id}/down")
    tuned_acks.wait_count(1, "/down/ack")
    read_acks.wait_count(1, "/down/ack")

    summary = await run_fleet(settings, registry, devices=4, interval_s=4.0, duration_s=12.0,
                              lwm2m_share=1.0, loss_up=0.0, loss_down=0.0,
                              nat_rebind_probability=0.0, faulty_share=0.0)

    acks = tuned_acks.wait_count(3, "/down/ack")
    assert [m["state"] for m in acks] == ["queued", "delivered", "confirmed"]
    assert acks[-1]["result"] == {"code": "2.04"}
    (confirmed_read,) = [m for m in read_acks.wait_count(3, "/down/ack")
                         if m["state"] == "confirmed"]
    # text/plain: the gateway knows no object model, so the value stays text
    assert confirmed_read["result"] == {"code": "2.05",
                                        "content": [{"path": "/1/0/3", "value": "4"}]}
    assert summary.lwm2m_interval_writes == 1
    assert summary.lost == 0
    per_device = Counter(json.loads(p)["device_id"] for topic, p in uplinks.lines()
                         if topic.endswith("/up"))
    others = [n for device, n in per_device.items() if device != tuned.device_id]
    # 4 s interval over a 12 s window: at most 4 reports each; at 1 s the tuned device
    # sends several times more once the Write arrived (right after its first Send).
    assert len(others) == 3 and max(others) <= 4
    assert per_device[tuned.device_id] >= 2.5 * max(others)
