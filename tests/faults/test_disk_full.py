"""The disk under the spool fills up (a small tmpfs), devices keep sending, the space is
freed: devices get 5.03 with Max-Age while nothing can be written, 2.04 again afterwards,
and every uplink acknowledged before, during and after is on MQTT."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

import aiocoap
import pytest

from tests.conftest import Broker, Subscription, paused, wait_for
from tests.faults.conftest import Disks, GatewayFactory, Witness, fill
from tests.faults.fleet import (
    OVERLOADED,
    SENDERS,
    SPOOL_ERROR,
    TS_BASE,
    Answer,
    DeviceClient,
    Fleet,
    Ledger,
    missing,
    wait_grows,
)

DISK_BYTES = 16 << 20  # more than the 4 MB at which SQLite checkpoints its log
MAX_AGE_S = 2
FAST_RETRY = {"NBIOT_COAP__OVERLOAD_MAX_AGE_S": str(MAX_AGE_S)}
CYCLES = 3
CONNECTED = "nbiot_gateway_mqtt_connected"
PUBLISHED = "nbiot_gateway_mqtt_published_total"
SPOOLED = "nbiot_gateway_spool_records"


def spool_rows(disk: Path) -> int:
    """Rows in the spool file, read directly (the gateway must have stopped)."""
    with contextlib.closing(sqlite3.connect(disk / "spool.sqlite")) as db:
        rows: int = db.execute("SELECT count(*) FROM records").fetchone()[0]
        return rows




def test_full_disk_answers_5_03_with_max_age_and_recovers_once_freed(
    disks: Disks, fault_gateway: GatewayFactory, subscribe: Callable[[str], Subscription]
) -> None:
    disk = disks.tmpfs(DISK_BYTES)
    gw = fault_gateway(spool_dir=disk, **FAST_RETRY)
    sub = subscribe("nbiot/#")
    ledger = Ledger()

    with Fleet(gw, ledger, max_uplinks=2000, max_s=60):
        wait_for(lambda: ledger.acked_count() >= 20, what="uplinks flowing")
        filler = fill(disk)
        wait_for(lambda: gw.rejected("spool_error") >= 10, what="5.03 spool_error, disk full")
        ready_while_full = gw.readyz()
        filler.unlink()
        wait_grows(ledger.acked_count, 20, "2.04 again after the space was freed")
        ready_after = gw.readyz()

    assert not ledger.broken_promises()
    assert not ledger.unanswered()
    assert SPOOL_ERROR in ledger.refusals() <= {SPOOL_ERROR, OVERLOADED}
    assert ledger.max_ages() == {MAX_AGE_S}
    assert "database or disk is full; the devices were answered 5.03" in gw.log()
    assert ready_while_full[0] == 503 and "spool writes failing" in ready_while_full[1]
    assert ready_after[0] == 200
    wait_for(lambda: not missing(ledger.acked(), sub), what="every acked uplink on MQTT")


def test_device_rebooted_while_the_disk_is_full_is_answered_once_space_is_freed(
    disks: Disks, fault_gateway: GatewayFactory, subscribe: Callable[[str], Subscription]
) -> None:
    """Issue 13: a device reboots (its seq restarts low, its clock is newer) while the disk
    is full and gets 5.03; once space is freed its retry and every other device's uplink
    must be answered, not left waiting on a spool that stopped writing."""
    disk = disks.tmpfs(DISK_BYTES)
    gw = fault_gateway(spool_dir=disk, **FAST_RETRY)
    sub = subscribe("nbiot/#")
    rebooting = SENDERS[0]
    with contextlib.ExitStack() as stack:
        clients = {d.device_id: stack.enter_context(DeviceClient(gw, d)) for d in SENDERS}
        device = clients[rebooting.device_id]
        before_reboot = device.uplink(100, TS_BASE + 100)
        assert before_reboot is not None and before_reboot.acked
        filler = fill(disk)
        # The spool's log is young, so its next commit needs space the disk no longer has.
        reboot = device.uplink(1, TS_BASE + 1000)
        assert reboot is not None, "no answer while the disk is full"
        assert (reboot.code, reboot.max_age_s, reboot.diagnostic) == (
            aiocoap.SERVICE_UNAVAILABLE, MAX_AGE_S, b"spool write failed")

        filler.unlink()
        # The rebooted device retries (same seq and time); every device sends, at once.
        answers = at_once({
            d.device_id: functools.partial(clients[d.device_id].uplink, 1,
                                           TS_BASE + (1000 if d is rebooting else 1), 8.0)
            for d in SENDERS})

    unanswered = sorted(d for d, a in answers.items() if a is None)
    assert not unanswered, (f"never answered after the space was freed: {unanswered}\n"
                            f"{gw.log_tail()}")
    assert {d: str(a) for d, a in answers.items() if a is not None and not a.acked} == {}
    acked = {d.device_id: {1} for d in SENDERS}
    acked[rebooting.device_id].add(100)
    wait_for(lambda: not missing(acked, sub), what="every acked uplink on MQTT")


def at_once(sends: dict[str, Callable[[], Answer | None]]) -> dict[str, Answer | None]:
    """Run each device's send in a thread of its own; their answers by device."""
    with concurrent.futures.ThreadPoolExecutor(len(sends)) as pool:
        futures = {d: pool.submit(send) for d, send in sends.items()}
        return {d: f.result() for d, f in futures.items()}


# -- long (./scripts/faults) ----------------------------------------------------------------
@pytest.mark.faults_long
def test_disk_filled_and_freed_again_and_again_loses_nothing(
    disks: Disks, fault_gateway: GatewayFactory, subscribe: Callable[[str], Subscription]
) -> None:
    disk = disks.tmpfs(DISK_BYTES)
    gw = fault_gateway(spool_dir=disk, **FAST_RETRY)
    sub = subscribe("nbiot/#")
    ledger = Ledger()

    with Fleet(gw, ledger, max_uplinks=5000, max_s=120):
        for cycle in range(1, CYCLES + 1):
            wait_grows(ledger.acked_count, 100, f"cycle {cycle}: 2.04")
            filler = fill(disk)
            wait_grows(lambda: gw.rejected("spool_error"), 50, f"cycle {cycle}: 5.03 spool_error")
            filler.unlink()
        wait_grows(ledger.acked_count, 100, "2.04 after the last cycle")

    assert not ledger.broken_promises()
    assert not ledger.unanswered()
    assert SPOOL_ERROR in ledger.refusals() <= {SPOOL_ERROR, OVERLOADED}
    wait_for(lambda: not missing(ledger.acked(), sub), what="every acked uplink on MQTT")
    # What the spool still holds after a restart is published again (at least once).
    assert gw.stop() == 0
    gw.start()
    wait_for(lambda: gw.metric(SPOOLED) == 0, what="the spool drained after a restart")


@pytest.mark.faults_long
def test_spool_accounts_for_deletions_that_failed_on_a_full_disk(
    disks: Disks, fault_gateway: GatewayFactory, broker: Broker, witness: Witness
) -> None:
    """The disk fills during a broker outage and the broker comes back while it is still
    full: the spool publishes, but cannot commit the deletion of what the broker acked.
    Those rows stay in the file (they go out again, at least once), and what the gateway
    says it leaves for the next start must be what the file holds."""
    disk = disks.tmpfs(DISK_BYTES)
    gw = fault_gateway(spool_dir=disk, **FAST_RETRY)
    first = witness()
    ledger = Ledger()

    with Fleet(gw, ledger, max_uplinks=3000, max_s=60):
        wait_for(lambda: ledger.acked_count() >= 20, what="uplinks flowing")
        broker.stop()
        wait_for(lambda: gw.metric(CONNECTED) == 0, what="the gateway noticing")
        wait_grows(ledger.acked_count, 10, "uplinks spooled while the broker is down")
        filler = fill(disk)
        wait_grows(lambda: gw.rejected("spool_error"), 10, "5.03, the disk full")
        with paused(gw):
            broker.start()
            second = witness()
        wait_grows(lambda: gw.metric(PUBLISHED), 10, "the spool published, the disk full")
        filler.unlink()
        wait_grows(ledger.acked_count, 20, "2.04 once freed")
    wait_for(lambda: not missing(ledger.acked(), first, second), what="every acked on MQTT")
    assert gw.stop() == 0

    left = spool_rows(disk)
    said = re.findall(r"stopped; (-?\d+) records remain spooled", gw.log())[-1]
    assert int(said) == left, f"the gateway said {said} records remain; the file holds {left}"
