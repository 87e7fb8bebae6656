"""The simulator's processes against the real gateway and mosquitto: the witness in a
process of its own streams every uplink to the fleet process that sent it; two fleet
processes merge into books that match the gateway's own counters exactly; a fleet loop
made to lag makes the summary withhold its latencies, and only then."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable

from gateway.config import MqttSection
from gateway.mqtt.client import MqttClient
from gateway.tools.sim.processes import Child
from gateway.tools.sim.witness import WitnessSpec, WitnessStats
from tests.conftest import Broker, Gateway
from tests.test_sim_e2e import REASON, fleet_gateway, run_fleet


async def test_witness_process_streams_each_uplink_to_its_fleet_process_with_its_arrival(
    broker: Broker,
) -> None:
    feeds = [os.pipe(), os.pipe()]
    witness = await Child.start("witness", "gateway.tools.sim.witness", tuple(w for _, w in feeds))
    for _, write_end in feeds:
        os.close(write_end)
    lines: list[list[str]] = [[], []]
    try:
        await witness.send(WitnessSpec(MqttSection(host="127.0.0.1", port=broker.port),
                                       "nbiot/plant/+/+/up", "nbiot/plant/invalid",
                                       tuple(w for _, w in feeds)))
        await witness.expect("subscribed", 20)
        await witness.send([["dev-a"], ["dev-b"]])
        await witness.expect("routed", 20)
        published_at = time.monotonic()
        client = await MqttClient.connect("127.0.0.1", broker.port, client_id="test-gateway")
        for seq in range(50):
            for device in ("dev-a", "dev-b"):
                body = {"device_id": device, "device_type": "env_th", "seq": seq, "readings": {}}
                await client.publish_and_wait(f"nbiot/plant/env_th/{device}/up",
                                              json.dumps(body).encode())
        await client.publish_and_wait("nbiot/plant/invalid", b'{"reason": "bad_token"}')
        await client.disconnect()
        await poll_feeds([r for r, _ in feeds], lines, until=lambda: sum(
            not line.startswith("@") for feed in lines for line in feed) >= 100)
        witness.close_input()  # stop: it reports
        stats: WitnessStats = await witness.expect("stats", 20)
    finally:
        for read_end, _ in feeds:
            os.close(read_end)
        await witness.stop()

    arrivals = [float(line[1:]) for feed in lines for line in feed if line.startswith("@")]
    keys = [[line for line in feed if not line.startswith("@")] for feed in lines]
    assert keys == [[f"dev-a {seq}" for seq in range(50)], [f"dev-b {seq}" for seq in range(50)]]
    # CLOCK_MONOTONIC is one clock for every process of the host: arrivals follow the
    # first publish in this process, and precede now.
    assert arrivals and all(published_at <= t <= time.monotonic() for t in arrivals)
    assert (stats.messages, stats.uplinks, stats.unparsable) == (101, 100, 0)
    assert stats.dead_letters_by_reason == {"bad_token": 1}


async def poll_feeds(fds: list[int], lines: list[list[str]], until: Callable[[], bool],
                     timeout_s: float = 20.0) -> None:
    """Read what the witness wrote to each feed (complete lines) until `until()`."""
    rest = [b""] * len(fds)
    for fd in fds:
        os.set_blocking(fd, False)
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, f"the feeds stopped at {lines}"
        for k, fd in enumerate(fds):
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            *complete, rest[k] = (rest[k] + chunk).split(b"\n")
            lines[k] += [c.decode() for c in complete]
        await asyncio.sleep(0.01)


async def test_two_fleet_processes_merge_into_books_matching_the_gateways_counters(
    gateway_factory: Callable[..., Gateway],
) -> None:
    gw, settings, registry = fleet_gateway(gateway_factory, 300)

    # No loss and no rebinding: every report reaches the gateway as exactly one request.
    summary = await run_fleet(settings, registry, processes=2, profile="faulty", loss_up=0.0,
                              loss_down=0.0, nat_rebind_probability=0.0, latency_scale=1.0)

    counted = {str(fault): int(gw.metric("nbiot_gateway_uplinks_rejected_total",
                                         {"reason": reason})) for fault, reason in REASON.items()}
    assert summary.processes == 2
    assert summary.sent == gw.metric("nbiot_gateway_uplinks_received_total")
    assert summary.acked == gw.metric("nbiot_gateway_uplinks_accepted_total")
    assert counted == summary.faults_injected
    assert summary.rejected_by_code == summary.expected_rejected_by_code
    assert summary.delivered == summary.acked and summary.lost == 0
    assert summary.duplicates_delivered == summary.foreign_delivered == 0
    # The gateway's side of the same run, from its /metrics.
    assert summary.gateway_uplinks == summary.sent
    assert summary.gateway_ack_latency_ms is not None
    assert summary.gateway_ack_latency_ms["p99"] is not None
    assert summary.gateway_cpu_per_uplink_us and summary.sim_cpu_per_report_us
    # A loop that kept time: latencies shown, no warning.
    assert not summary.latencies_distorted
    assert "ran late" not in summary.table()


async def test_a_lagging_fleet_loop_makes_the_summary_withhold_its_latencies(
    gateway_factory: Callable[..., Gateway],
) -> None:
    _, settings, registry = fleet_gateway(gateway_factory, 50)

    summary = await run_fleet(settings, registry, devices=50, duration_s=3.0, loop_stall_ms=300.0)

    table = summary.table()
    assert summary.fleet_lag_ms["max"] is not None and summary.fleet_lag_ms["max"] >= 250
    assert summary.latencies_distorted
    assert "the simulator ran late" in table
    assert table.count("not shown: the simulator ran late") == 2  # ack and delivery rows
    assert summary.lost == 0


async def test_the_witness_failing_to_subscribe_stops_the_run_with_its_reason() -> None:
    witness = await Child.start("witness", "gateway.tools.sim.witness", ())
    try:
        # Nothing listens on port 9 (discard) on loopback here.
        await witness.send(WitnessSpec(MqttSection(host="127.0.0.1", port=9),
                                       "nbiot/plant/+/+/up", "nbiot/plant/invalid", ()))
        kind, reason = await asyncio.wait_for(witness.receive(), 20)
    finally:
        await witness.stop()

    assert kind == "failed"
    assert "cannot subscribe at broker 127.0.0.1:9" in reason
