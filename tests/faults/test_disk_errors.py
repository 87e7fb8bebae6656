"""The disk fails writes or fsyncs (libfiu's POSIX preload, switched on and off in the
running gateway with fiu-ctrl): devices get 5.03 with Max-Age while commits fail, nothing
acknowledged is lost, and 2.04 comes back once the fault is gone."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import Subscription, wait_for
from tests.faults.conftest import GatewayFactory
from tests.faults.fleet import OVERLOADED, SPOOL_ERROR, Fleet, Ledger, missing, wait_grows

MAX_AGE_S = 2
EIO = 5
# SQLite's unix VFS writes pages with pwrite(2) and syncs the WAL with fdatasync(2).
POINTS = {"fdatasync": ("posix/io/sync/fdatasync", "disk I/O error"),
          "pwrite": ("posix/io/rw/pwrite", "disk I/O error")}


@pytest.mark.parametrize("call", sorted(POINTS))
def test_failing_disk_call_answers_5_03_and_recovers_when_it_works_again(
    call: str, fault_gateway: GatewayFactory, subscribe: Callable[[str], Subscription]
) -> None:
    point, sqlite_error = POINTS[call]
    gw = fault_gateway(fiu=True, NBIOT_COAP__OVERLOAD_MAX_AGE_S=str(MAX_AGE_S))
    sub = subscribe("nbiot/#")
    ledger = Ledger()

    with Fleet(gw, ledger, max_uplinks=2000, max_s=60):
        wait_for(lambda: ledger.acked_count() >= 20, what="uplinks flowing")
        gw.fiu(f"enable name={point},failinfo={EIO}")
        try:
            wait_for(lambda: gw.rejected("spool_error") >= 10, what=f"5.03 while {call} fails")
        finally:
            gw.fiu(f"disable name={point}")
        wait_grows(ledger.acked_count, 20, f"2.04 again once {call} works")

    assert not ledger.broken_promises()
    assert not ledger.unanswered()
    assert SPOOL_ERROR in ledger.refusals() <= {SPOOL_ERROR, OVERLOADED}
    assert ledger.max_ages() == {MAX_AGE_S}
    assert f"failed: {sqlite_error}; the devices were answered 5.03" in gw.log()
    wait_for(lambda: not missing(ledger.acked(), sub), what="every acked uplink on MQTT")


# -- long (./scripts/faults) ----------------------------------------------------------------
@pytest.mark.faults_long
def test_writes_and_fsyncs_failing_at_random_lose_no_acked_uplink(
    fault_gateway: GatewayFactory, subscribe: Callable[[str], Subscription]
) -> None:
    gw = fault_gateway(fiu=True, NBIOT_COAP__OVERLOAD_MAX_AGE_S=str(MAX_AGE_S))
    sub = subscribe("nbiot/#")
    ledger = Ledger()

    with Fleet(gw, ledger, max_uplinks=5000, max_s=120):
        wait_for(lambda: ledger.acked_count() >= 20, what="uplinks flowing")
        for point, _ in POINTS.values():
            # 5% of calls: a commit makes several (WAL frames of 1 KiB pages, one fdatasync).
            gw.fiu(f"enable_random name={point},probability=0.05,failinfo={EIO}")
        try:
            wait_grows(ledger.acked_count, 300, "2.04 between the failures")
            wait_for(lambda: gw.rejected("spool_error") >= 50, what="5.03 for the failures")
        finally:
            for point, _ in POINTS.values():
                gw.fiu(f"disable name={point}")
        wait_grows(ledger.acked_count, 100, "2.04 once the disk works")

    assert not ledger.broken_promises()
    assert not ledger.unanswered()
    assert SPOOL_ERROR in ledger.refusals() <= {SPOOL_ERROR, OVERLOADED}
    wait_for(lambda: not missing(ledger.acked(), sub), what="every acked uplink on MQTT")
    # The file the failures left behind opens and drains.
    assert gw.stop() == 0
    gw.start()
    wait_for(lambda: gw.metric("nbiot_gateway_spool_records") == 0, what="the spool drained")
