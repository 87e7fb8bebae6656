"""The fleet simulator end to end: a few hundred simulated devices, faulty ones included,
against the real gateway (subprocess) and the real mosquitto, with the simulator's own
MQTT witness proving delivery. Short runs: a few seconds of reports each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import Settings, load_config
from gateway.pipeline.registry import Registry, load_registry
from gateway.tools.sim.command import sim_section
from gateway.tools.sim.payloads import EXPECTED_CODE, Fault
from gateway.tools.sim.registry_file import make_registry
from gateway.tools.sim.report import Summary
from gateway.tools.sim.run import simulate
from tests.conftest import Gateway

DEVICES = 300
# The gateway's rejection reason for each fault the simulator injects.
REASON = {
    Fault.MALFORMED: "bad_payload",
    Fault.OUT_OF_RANGE: "out_of_range",
    Fault.WRONG_TOKEN: "bad_token",
    Fault.UNKNOWN_ID: "unknown_device",
    Fault.OVERSIZED: "payload_too_large",
}


def fleet_gateway(gateway_factory: Callable[..., Gateway], devices: int) -> tuple[Gateway, Settings,
                                                                               Registry]:
    """The gateway with a registry of `devices` simulated devices instead of the 5 defaults."""
    gw = gateway_factory(start=False)
    registry_path = gw.workdir / "devices.csv"
    registry_path.unlink()
    settings = load_config(gw.config_path)
    make_registry(registry_path, devices, settings.types, report_interval_s=2)
    gw.start()
    return gw, settings, load_registry(registry_path, settings.types)


async def run_fleet(settings: Settings, registry: Registry, **overrides: Any) -> Summary:
    sim = sim_section(settings.sim, {
        "devices": DEVICES, "interval_s": 2.0, "duration_s": 5.0, "seed": 20251123,
        "latency_scale": 0.5, "drain_s": 20.0, "grace_s": 15.0, **overrides})
    return await simulate(settings, registry, sim)


async def test_faulty_fleet_over_a_lossy_radio_loses_nothing_and_each_fault_gets_its_code(
    gateway_factory: Callable[..., Gateway],
) -> None:
    _, settings, registry = fleet_gateway(gateway_factory, DEVICES)

    summary = await run_fleet(settings, registry, profile="faulty", loss_up=0.02, loss_down=0.02,
                              nat_rebind_probability=0.5)

    # Delivery: nothing acked is lost, nothing is forwarded twice (retransmissions from a
    # new NAT port included), nothing refused is forwarded.
    assert summary.retransmissions > 0 and summary.nat_rebinds > 0
    assert summary.acked > 0.5 * summary.sent
    assert summary.lost == 0
    assert summary.duplicates_delivered == 0
    assert summary.delivered == summary.acked + summary.delivered_unacked
    assert summary.delivered_rejected == 0
    # Faults: every kind was injected, and each drew exactly its own error code.
    assert set(summary.faults_injected) == {str(f) for f in Fault}
    for fault, answers in summary.fault_answers.items():
        assert set(answers) == {EXPECTED_CODE[Fault(fault)]}, fault
    assert summary.rejected_by_code == summary.expected_rejected_by_code


async def test_gateway_counts_every_injected_fault_once_under_its_reason(
    gateway_factory: Callable[..., Gateway],
) -> None:
    gw, settings, registry = fleet_gateway(gateway_factory, DEVICES)

    # No loss and no rebinding: every uplink reaches the gateway as exactly one request.
    summary = await run_fleet(settings, registry, profile="faulty", loss_up=0.0, loss_down=0.0,
                              nat_rebind_probability=0.0)

    counted = {str(fault): int(gw.metric("nbiot_gateway_uplinks_rejected_total",
                                         {"reason": reason})) for fault, reason in REASON.items()}
    assert counted == summary.faults_injected
    assert gw.metric("nbiot_gateway_uplinks_accepted_total") == summary.acked
    assert summary.lost == 0
    assert summary.timeouts == summary.abandoned == 0


def test_registry_for_the_sim_is_a_mix_of_every_configured_type(tmp_path: Path) -> None:
    settings = load_config(Path(__file__).resolve().parent.parent / "config" / "gateway.toml")

    registry = load_registry(make_registry(tmp_path / "d.csv", 1000, settings.types), settings.types)

    counts: dict[str, int] = {}
    for device in registry:
        counts[device.device_type] = counts.get(device.device_type, 0) + 1
    assert len(registry) == 1000
    assert set(counts) == set(settings.types)
    assert len({d.token for d in registry}) == 1000
