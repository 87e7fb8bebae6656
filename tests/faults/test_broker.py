"""The broker fails while uplinks flow: killed (SIGKILL) with a window of publishes
unacknowledged and restarted on the same port, or frozen (SIGSTOP) then resumed. Devices
keep getting 2.04 (the spool holds their uplinks), the gateway re-sends whatever the broker
had not acknowledged, and every acked uplink reaches MQTT."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import pytest

from tests.conftest import Broker, paused, wait_for
from tests.faults.conftest import GatewayFactory, Witness
from tests.faults.fleet import OVERLOADED, Fleet, Ledger, missing, wait_grows

CONNECTED = "nbiot_gateway_mqtt_connected"
RECONNECTS = "nbiot_gateway_mqtt_reconnects_total"
SPOOLED = "nbiot_gateway_spool_records"
CYCLES = 3




@contextlib.contextmanager
def stopped(broker: Broker) -> Iterator[None]:
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        if broker.proc is not None and broker.proc.poll() is None:
            broker.proc.send_signal(signal.SIGCONT)


def test_broker_killed_mid_window_and_restarted_loses_no_acked_uplink(
    fault_gateway: GatewayFactory, broker: Broker, witness: Witness
) -> None:
    gw = fault_gateway()
    before = witness()
    ledger = Ledger()

    with Fleet(gw, ledger, max_uplinks=2000, max_s=60):
        wait_for(lambda: ledger.acked_count() >= 20, what="uplinks flowing")
        with stopped(broker):  # publishes pile up unacknowledged: the window is full
            wait_for(lambda: gw.metric(SPOOLED) >= 20, what="records waiting for a PUBACK")
            assert broker.proc is not None
            broker.proc.kill()
            broker.proc.wait(10)
        wait_for(lambda: gw.metric(CONNECTED) == 0, what="the gateway noticing")
        wait_grows(ledger.acked_count, 20, "2.04 while the broker is down")
        with paused(gw):
            broker.start()  # the same port
            after = witness()
        wait_for(lambda: gw.metric(CONNECTED) == 1, what="the gateway reconnected")
        wait_grows(ledger.acked_count, 20, "uplinks flowing")

    assert not ledger.broken_promises()
    assert ledger.refusals() <= {OVERLOADED}
    assert gw.metric(RECONNECTS) >= 1
    assert "unavailable (connection lost" in gw.log()
    wait_for(lambda: not missing(ledger.acked(), before, after), what="every acked uplink on MQTT")


def test_broker_frozen_then_resumed_loses_no_acked_uplink(
    fault_gateway: GatewayFactory, broker: Broker, witness: Witness
) -> None:
    gw = fault_gateway()
    sub = witness()
    ledger = Ledger()

    with Fleet(gw, ledger, max_uplinks=2000, max_s=60):
        wait_for(lambda: ledger.acked_count() >= 20, what="uplinks flowing")
        with stopped(broker):
            wait_grows(ledger.acked_count, 40, "2.04 while the broker is frozen")
            spooled_while_frozen = gw.metric(SPOOLED)
            ready_while_frozen = gw.readyz()
        wait_grows(ledger.acked_count, 20, "uplinks flowing")

    assert not ledger.broken_promises()
    assert ledger.refusals() <= {OVERLOADED}
    assert spooled_while_frozen >= 40
    assert ready_while_frozen == (200, "ready: broker connected")  # keepalive not yet expired
    wait_for(lambda: not missing(ledger.acked(), sub), what="every acked uplink on MQTT")
    wait_for(lambda: gw.metric(SPOOLED) == 0, what="the spool drained")


# -- long (./scripts/faults) ----------------------------------------------------------------
@pytest.mark.faults_long
def test_broker_killed_and_restarted_again_and_again_loses_no_acked_uplink(
    fault_gateway: GatewayFactory, broker: Broker, witness: Witness
) -> None:
    gw = fault_gateway()
    witnesses = [witness()]
    ledger = Ledger()

    with Fleet(gw, ledger, max_uplinks=5000, max_s=120):
        for cycle in range(1, CYCLES + 1):
            wait_grows(ledger.acked_count, 100, f"cycle {cycle}: uplinks flowing")
            with stopped(broker):
                wait_grows(lambda: gw.metric(SPOOLED), 20, f"cycle {cycle}: a window unacked")
                assert broker.proc is not None
                broker.proc.kill()
                broker.proc.wait(10)
            wait_for(lambda: gw.metric(CONNECTED) == 0, what=f"cycle {cycle}: noticed")
            wait_grows(ledger.acked_count, 50, f"cycle {cycle}: 2.04 while the broker is down")
            with paused(gw):
                broker.start()
                witnesses.append(witness())
            wait_for(lambda: gw.metric(CONNECTED) == 1, what=f"cycle {cycle}: reconnected")
        wait_grows(ledger.acked_count, 100, "uplinks flowing after the last cycle")

    assert not ledger.broken_promises()
    assert ledger.refusals() <= {OVERLOADED}
    assert gw.metric(RECONNECTS) >= CYCLES
    wait_for(lambda: not missing(ledger.acked(), *witnesses), what="every acked uplink on MQTT")
    wait_for(lambda: gw.metric(SPOOLED) == 0, what="the spool drained")


@pytest.mark.faults_long
def test_broker_frozen_past_the_keepalive_is_dropped_and_reconnected_losing_nothing(
    fault_gateway: GatewayFactory, broker: Broker, witness: Witness
) -> None:
    """A broker that stops answering (SIGSTOP) for longer than the keepalive: the gateway
    gives up on the connection, its reconnect gets no CONNACK (the kernel still accepts
    the TCP connection), devices keep getting 2.04, and once the broker resumes the
    gateway reconnects and publishes everything."""
    gw = fault_gateway(NBIOT_MQTT__KEEPALIVE_S="5")
    sub = witness()
    ledger = Ledger()

    with Fleet(gw, ledger, max_uplinks=5000, max_s=120):
        wait_for(lambda: ledger.acked_count() >= 20, what="uplinks flowing")
        with stopped(broker):
            wait_for(lambda: gw.metric(CONNECTED) == 0, what="the silent broker dropped")
            wait_grows(ledger.acked_count, 50, "2.04 while the broker is frozen")
            ready_while_frozen = gw.readyz()
        wait_for(lambda: gw.metric(CONNECTED) == 1, timeout=30, what="reconnected")
        wait_grows(ledger.acked_count, 50, "uplinks flowing")

    assert not ledger.broken_promises()
    assert ledger.refusals() <= {OVERLOADED}
    assert ready_while_frozen == (200, "ready: broker disconnected, spooling")
    assert "(broker silent for 2s (no PINGRESP))" in gw.log()
    wait_for(lambda: not missing(ledger.acked(), sub), what="every acked uplink on MQTT")
    wait_for(lambda: gw.metric(SPOOLED) == 0, what="the spool drained")
