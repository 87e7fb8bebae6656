"""The disk under the spool stalls (an ext4 image on a loop device, frozen with fsfreeze:
every write and fsync waits until it is thawed). The event loop must not stall with it:
/healthz, /metrics and /readyz answer, and every uplink waiting for its commit gets its
2.04 once the disk moves again. A device retransmitting meanwhile gets no answer (its
request is still being processed), as RFC 7252 has it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest

from tests.conftest import Subscription, wait_for
from tests.faults.conftest import Disks, GatewayFactory, Witness
from tests.faults.fleet import OVERLOADED, SENDERS, Fleet, Ledger, missing, wait_grows

RETRANSMISSIONS = "nbiot_gateway_coap_retransmissions_total"


def test_stalled_disk_delays_2_04_until_it_moves_and_loses_nothing(
    disks: Disks, fault_gateway: GatewayFactory, subscribe: Callable[[str], Subscription]
) -> None:
    disk = disks.ext4()
    gw = fault_gateway(spool_dir=disk)
    sub = subscribe("nbiot/#")
    ledger = Ledger()

    # A device waits up to 60 s for its answer: longer than the stall lasts here.
    with Fleet(gw, ledger, max_uplinks=2000, max_s=90, within_s=60):
        wait_for(lambda: ledger.acked_count() >= 20, what="uplinks flowing")
        with disks.frozen(disk):
            retransmitted = gw.metric(RETRANSMISSIONS)
            # Every device is waiting for a commit and retransmitting its request.
            wait_for(lambda: gw.metric(RETRANSMISSIONS) >= retransmitted + 2 * len(SENDERS),
                     what="devices retransmitting while the disk is frozen")
            ready_while_stalled = gw.readyz()
            acked_while_stalled = ledger.acked_count()
        wait_for(lambda: ledger.acked_count() >= acked_while_stalled + 20,
                 what="2.04 again once the disk moves")

    assert ready_while_stalled[0] == 200
    assert not ledger.broken_promises()
    assert not ledger.unanswered()
    assert ledger.refusals() <= {OVERLOADED}
    wait_for(lambda: not missing(ledger.acked(), sub), what="every acked uplink on MQTT")


# -- long (./scripts/faults) ----------------------------------------------------------------
@pytest.mark.faults_long
def test_disk_stalled_past_the_devices_patience_answers_their_retries_once_it_moves(
    disks: Disks, fault_gateway: GatewayFactory, witness: Witness
) -> None:
    """Devices give up on an answer after 2 s and send their reading again (a new request,
    the same seq): the retries wait for the stalled commit of the first one and get its
    2.04 once the disk moves, and each reading reaches MQTT once."""
    disk = disks.ext4()
    gw = fault_gateway(spool_dir=disk)
    sub = witness()
    ledger = Ledger()

    with Fleet(gw, ledger, max_uplinks=2000, max_s=90, within_s=2):
        wait_for(lambda: ledger.acked_count() >= 20, what="uplinks flowing")
        with disks.frozen(disk):
            wait_for(lambda: gave_up_twice(ledger), timeout=30,
                     what="every device giving up twice on the stalled disk")
        wait_grows(ledger.acked_count, 20, "2.04 again once the disk moves")

    assert not ledger.broken_promises()
    assert ledger.refusals() <= {OVERLOADED}
    unanswered = ledger.unanswered()
    assert {device_id for device_id, _ in unanswered} == {d.device_id for d in SENDERS}
    acked = ledger.acked()
    assert all(seq in acked[device_id] for device_id, seq in unanswered)
    wait_for(lambda: not missing(acked, sub), what="every acked uplink on MQTT")
    published = Counter((m["device_id"], m["seq"]) for m in sub.messages("/up"))
    assert {key: n for key, n in published.items() if n > 1} == {}, "a retry stored twice"


def gave_up_twice(ledger: Ledger) -> bool:
    gave_up = ledger.gave_up()
    return all(gave_up[d.device_id] >= 2 for d in SENDERS)
