"""Replay protection: the per-device high-water mark and 64-seq window, in memory (unit)
and across a gateway restart (end to end)."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
from collections.abc import Callable
from typing import Any

import aiocoap
import pytest

from gateway.pipeline.replay import ReplayWindow, Seen
from gateway.store.spool import fold_seq_log
from tests.coap_raw import RawCoap, uplink_request
from tests.conftest import DEVICES, Gateway, Subscription, wait_for
from tests.test_dedup import send_barrier, seqs_published_through

TH = DEVICES[0]
T0 = 1_763_900_000


def test_seqs_above_or_inside_the_window_are_new_once_and_duplicates_after() -> None:
    window = ReplayWindow()
    for seq in (10, 12, 11, 74):
        assert window.check("d", seq, None) is Seen.NEW
        window.accept("d", seq, None, Seen.NEW)

    assert [window.check("d", s, None) for s in (10, 11, 12, 74)] == [Seen.STALE,
                                                                      Seen.DUPLICATE,
                                                                      Seen.DUPLICATE,
                                                                      Seen.DUPLICATE]
    assert window.check("d", 13, None) is Seen.NEW  # inside the window, never seen
    assert window.check("other", 10, None) is Seen.NEW


def test_a_counter_restart_is_accepted_only_with_a_newer_device_time() -> None:
    window = ReplayWindow()
    window.accept("d", 500, 1_000.0, Seen.NEW)

    assert window.check("d", 1, None) is Seen.STALE
    assert window.check("d", 1, 999.0) is Seen.STALE
    assert window.check("d", 1, 1_001.0) is Seen.RESET
    window.accept("d", 1, 1_001.0, Seen.RESET)
    assert window.check("d", 1, 1_001.0) is Seen.DUPLICATE
    assert window.check("d", 2, None) is Seen.NEW


def test_a_counter_restart_inside_the_window_is_told_apart_by_a_newer_time() -> None:
    window = ReplayWindow()
    for seq in range(11):
        window.accept("d", seq, 1_000.0 + seq, Seen.NEW)

    assert window.check("d", 0, 1_000.0) is Seen.DUPLICATE  # a late retransmission
    assert window.check("d", 0, 5_000.0) is Seen.RESET  # the device rebooted
    window.accept("d", 0, 5_000.0, Seen.RESET)
    assert window.check("d", 1, 5_001.0) is Seen.NEW


def test_a_huge_seq_jump_starts_a_fresh_bitmap_at_once() -> None:
    window = ReplayWindow()
    window.accept("d", 5, 100.0, Seen.NEW)
    huge = 2**63 - 1  # INT64_MAX, as firmware sends for "no counter"
    assert window.check("d", huge, 101.0) is Seen.NEW
    window.accept("d", huge, 101.0, Seen.NEW)  # a shift by 2^63 would never finish

    assert window.snapshot("d") == (huge, 1, 101.0)
    assert window.check("d", huge, 101.0) is Seen.DUPLICATE
    assert window.check("d", 6, None) is Seen.STALE  # replay protection: lower seqs stale
    assert window.check("d", 6, 102.0) is Seen.RESET  # unless the device clock moved on


def test_a_jump_of_exactly_the_window_keeps_only_the_new_mark() -> None:
    window = ReplayWindow()
    window.accept("d", 10, None, Seen.NEW)
    window.accept("d", 10 + 64, None, Seen.NEW)

    assert window.snapshot("d") == (74, 1, None)
    assert window.check("d", 11, None) is Seen.NEW  # inside the window, never accepted
    assert window.check("d", 10, None) is Seen.STALE  # left the window


def test_an_accept_below_the_window_sets_no_bit_outside_64() -> None:
    """The spool's writer replays accepts onto the state the file holds; one that lies
    below that state's window (a failed commit rolled a reset back) must not set bit 999."""
    window = ReplayWindow()
    window.accept("d", 1000, 50.0, Seen.NEW)
    window.accept("d", 1, 60.0, Seen.NEW)

    hwm, bitmap, last_ts = window.snapshot("d") or (0, 0, None)
    assert (hwm, bitmap, last_ts) == (1000, 1, 60.0)
    assert bitmap < 1 << 64


def test_state_round_trips_through_its_saved_form() -> None:
    window = ReplayWindow()
    for seq in (1, 3, 64, 65):
        window.accept("d", seq, 5.0, Seen.NEW)
    state = window.snapshot("d")
    assert state is not None

    restored = ReplayWindow({"d": state})

    assert [restored.check("d", s, None) for s in (1, 2, 3, 65, 66)] == [
        Seen.STALE, Seen.NEW, Seen.DUPLICATE, Seen.DUPLICATE, Seen.NEW]


def test_accepted_seq_is_not_forwarded_again_after_a_restart(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("nbiot/#")
    body = {"seq": 40, "ts": 1_763_900_000, "temperature": 20.0}
    with RawCoap(gateway.coap_port) as device:
        assert device.exchange(uplink_request(gateway.uri(TH), body)).code == aiocoap.CHANGED
    assert gateway.stop() == 0

    gateway.start()
    with RawCoap(gateway.coap_port) as replayed:
        again = replayed.exchange(uplink_request(gateway.uri(TH), body))
    send_barrier(gateway, seq=41)

    assert again.code == aiocoap.CHANGED
    assert seqs_published_through(sub, barrier_seq=41) == [40, 41]
    assert gateway.metric("nbiot_gateway_uplinks_duplicate_total") == 1


def test_stale_seq_is_refused_and_a_restarted_counter_with_newer_time_is_accepted(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("nbiot/#")
    with RawCoap(gateway.coap_port) as device:
        first = device.exchange(uplink_request(
            gateway.uri(TH), {"seq": 1000, "ts": 1_763_900_000, "temperature": 20.0}))
        replay = device.exchange(uplink_request(
            gateway.uri(TH), {"seq": 3, "ts": 1_763_800_000, "temperature": 20.0}))
        rebooted = device.exchange(uplink_request(
            gateway.uri(TH), {"seq": 1, "ts": 1_763_900_060, "temperature": 21.0}))

    assert (first.code, rebooted.code) == (aiocoap.CHANGED, aiocoap.CHANGED)
    assert replay.code == aiocoap.BAD_REQUEST
    assert replay.payload.startswith(b"seq 3 is far below 1000")
    assert gateway.metric("nbiot_gateway_uplinks_rejected_total", {"reason": "stale_seq"}) == 1
    assert [m["seq"] for m in sub.wait_count(2)] == [1000, 1]


def reading(seq: int) -> dict[str, Any]:
    """Uplink `seq` of TH, with the device time it was first sent with (as a retry has)."""
    return {"seq": seq, "ts": T0 + seq, "temperature": 20.0}


def spool_file(gateway: Gateway, query: str, *params: object) -> list[tuple[Any, ...]]:
    """Rows of the gateway's spool file as committed (a WAL reader: the gateway may run)."""
    with contextlib.closing(sqlite3.connect(gateway.workdir / "spool.sqlite")) as db:
        return db.execute(query, params).fetchall()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_a_full_window_holds_across_a_restart(
    gateway: Gateway, subscribe: Callable[[str], Subscription], stop: signal.Signals
) -> None:
    """70 consecutive seqs: every bit of the window is set, bit 63 (seq 7) included, which
    the spool must store as a signed 64-bit integer and read back."""
    sub = subscribe("nbiot/#")
    hwm = 70
    with RawCoap(gateway.coap_port) as device:
        acked = [device.exchange(uplink_request(gateway.uri(TH), reading(seq))).code
                 for seq in range(1, hwm + 1)]
    assert acked == [aiocoap.CHANGED] * hwm
    # Published and deleted from the file: after kill -9 nothing may legitimately be re-sent.
    sub.wait_count(hwm)
    wait_for(lambda: spool_file(gateway, "SELECT count(*) FROM records") == [(0,)],
             what="the published records deleted from the spool file")
    rc = gateway.stop(stop)
    # A kill -9 leaves the accepts in seq_log: fold them as the next open would, so the
    # signed 64-bit form of device_seqs is what is read here, after either stop.
    with contextlib.closing(sqlite3.connect(gateway.workdir / "spool.sqlite",
                                            isolation_level=None)) as db:
        fold_seq_log(db)
    [(saved_hwm, saved_bitmap)] = spool_file(
        gateway, "SELECT hwm, bitmap FROM device_seqs WHERE device_id = ?", TH.device_id)
    assert (saved_hwm, saved_bitmap % 2**64 >> 63) == (hwm, 1), "bit 63 of the window is set"

    gateway.start()
    with RawCoap(gateway.coap_port) as device:
        oldest_in_window = device.exchange(uplink_request(gateway.uri(TH), reading(hwm - 63)))
        newest = device.exchange(uplink_request(gateway.uri(TH), reading(hwm)))
        below_window = device.exchange(uplink_request(gateway.uri(TH), reading(hwm - 64)))
    send_barrier(gateway, seq=hwm + 1)

    assert rc == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
    assert (oldest_in_window.code, newest.code) == (aiocoap.CHANGED, aiocoap.CHANGED)
    assert below_window.code == aiocoap.BAD_REQUEST
    assert below_window.payload.startswith(b"seq 6 is far below 70")
    assert seqs_published_through(sub, barrier_seq=hwm + 1) == list(range(1, hwm + 2))
    assert gateway.metric("nbiot_gateway_uplinks_duplicate_total") == 2


def test_a_reset_keeps_the_devices_new_time() -> None:
    window = ReplayWindow()
    window.accept("d", 900, 50.0, Seen.NEW)
    window.accept("d", 1, 60.0, Seen.RESET)

    assert window.snapshot("d") == (1, 1, 60.0)
    assert window.check("d", 1, 60.0) is Seen.DUPLICATE
