"""Downlink end to end with the simulator: the plant's optimiser publishes a new report
interval for one device; the command is queued, delivered in the reply to that device's
next uplink, confirmed by the one after, and the device then reports at the new pace."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

from tests.conftest import Broker, Gateway, Subscription
from tests.test_downlink import publish_command
from tests.test_sim_e2e import fleet_gateway, run_fleet

FLEET = 4


async def test_command_changes_a_simulated_devices_report_interval(
    gateway_factory: Callable[..., Gateway], broker: Broker,
    subscribe: Callable[[str], Subscription],
) -> None:
    _, settings, registry = fleet_gateway(gateway_factory, FLEET)
    tuned = next(iter(registry))
    base = f"nbiot/plant/{tuned.device_type}/{tuned.device_id}"
    acks = subscribe(f"{base}/down/ack")
    uplinks = subscribe("nbiot/plant/+/+/up")
    publish_command(broker, {"id": "faster", "set": {"report_interval_s": 0.5}},
                    topic=f"{base}/down")
    acks.wait_count(1, "/down/ack")

    summary = await run_fleet(settings, registry, devices=FLEET, interval_s=3.0,
                              duration_s=9.0, profile="steady", loss_up=0.0, loss_down=0.0,
                              nat_rebind_probability=0.0, faulty_share=0.0)

    states = [m["state"] for m in acks.wait_count(3, "/down/ack")]
    assert states == ["queued", "delivered", "confirmed"]
    assert summary.downlinks_applied == 1
    assert summary.lost == 0
    per_device = Counter(json.loads(p)["device_id"] for topic, p in uplinks.lines()
                         if topic.endswith("/up"))
    others = [n for device, n in per_device.items() if device != tuned.device_id]
    # 3 s interval over a 9 s window: at most 4 reports each; at 0.5 s the tuned device
    # sends several times more once the command arrived.
    assert max(others) <= 4
    assert per_device[tuned.device_id] >= 2 * max(others)
