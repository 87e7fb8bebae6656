"""The gateway's wall clock jumps (an NTP step, a VM resumed), forward then back, while
uplinks flow; libfaketime moves the wall clock of the running gateway (the monotonic
clock cannot jump, and is left alone). Devices keep getting 2.04: replay protection
trusts the devices' own `ts`, and every timeout of the gateway runs on the monotonic clock.
What moves is `received_at` on MQTT, which follows the wall clock."""

from __future__ import annotations

import datetime
import json
import time
from collections import Counter

import pytest

from tests.conftest import Subscription, wait_for
from tests.faults.conftest import GatewayFactory, Witness
from tests.faults.fleet import OVERLOADED, SENDERS, Fleet, Ledger, missing, wait_grows

DAY_S = 86_400
HOUR_S = 3_600
STATE_CHANGES = "nbiot_gateway_device_state_changes_total"


def latest_received_at(sub: Subscription) -> float:
    """Wall-clock second of the uplink the gateway stamped last (0 before any)."""
    stamps = [datetime.datetime.fromisoformat(m["received_at"]).timestamp()
              for m in sub.messages("/up")[-20:]]
    return stamps[-1] if stamps else 0.0


def test_wall_clock_jumps_forward_and_back_and_every_uplink_is_answered(
    fault_gateway: GatewayFactory, witness: Witness
) -> None:
    gw = fault_gateway(faketime=True)
    sub = witness()
    ledger = Ledger()

    with Fleet(gw, ledger, max_uplinks=3000, max_s=60):
        wait_for(lambda: ledger.acked_count() >= 20, what="uplinks flowing")
        gw.step_clock(+DAY_S)
        wait_for(lambda: latest_received_at(sub) > time.time() + DAY_S - 60,
                 what="received_at a day ahead")
        gw.step_clock(-DAY_S)  # two days back
        wait_for(lambda: latest_received_at(sub) < time.time() - DAY_S + 60,
                 what="received_at a day behind")
        wait_grows(ledger.acked_count, 20, "uplinks flowing")

    assert not ledger.broken_promises()
    assert ledger.refusals() <= {OVERLOADED}
    wait_for(lambda: not missing(ledger.acked(), sub), what="every acked uplink on MQTT")


# -- long (./scripts/faults) ----------------------------------------------------------------
@pytest.mark.faults_long
def test_wall_clock_jumping_forward_marks_no_reporting_device_offline(
    fault_gateway: GatewayFactory, witness: Witness
) -> None:
    """Devices report every 3 s (their registry interval is 60 s, offline after 180 s of
    silence) and the wall clock jumps an hour ahead: none of them has been silent, so
    none may be published offline. Silence is a duration; the monotonic clock measures it."""
    gw = fault_gateway(faketime=True, NBIOT_LIVENESS__CHECK_INTERVAL_S="1")
    sub = witness()
    ledger = Ledger()

    with Fleet(gw, ledger, max_uplinks=100, max_s=60, pause_s=3):
        wait_for(lambda: len(reported_since(sub, 0)) == len(SENDERS), what="every device online")
        gw.step_clock(+HOUR_S)
        wait_for(lambda: len(reported_since(sub, time.time() + HOUR_S - 60, times=2))
                 == len(SENDERS), timeout=30, what="every device reporting twice after the jump")

    assert not ledger.broken_promises()
    offline = [payload for topic, payload in sub.lines()
               if topic.startswith("nbiot/plant/") and topic.endswith("/status")
               and json.loads(payload)["state"] == "offline"]
    assert offline == [], "devices reporting every 3 s were published offline"
    assert gw.metric(STATE_CHANGES, {"state": "offline"}) == 0


def reported_since(sub: Subscription, wall_s: float, times: int = 1) -> set[str]:
    """Devices with at least `times` uplinks stamped at or after `wall_s`."""
    counts = Counter(m["device_id"] for m in sub.messages("/up")
                     if datetime.datetime.fromisoformat(m["received_at"]).timestamp() >= wall_s)
    return {device_id for device_id, n in counts.items() if n >= times}
