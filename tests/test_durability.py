"""The core promise: a 2.04 means the uplink WILL reach MQTT, across broker outages,
gateway restarts, SIGTERM and `kill -9`. Real mosquitto, real gateway subprocess, real UDP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
from collections.abc import Callable

import aiocoap

from gateway.mqtt.publisher import Backoff
from tests.conftest import DEVICES, Broker, Device, Gateway, Subscription, paused, wait_for

SENDERS = [d for d in DEVICES if not d.device_id.startswith("off-")]
READING = {"env_th": {"temperature": 21.5}, "power_meter": {"voltage": 230.0}, "gas": {"h2": 12.0}}
N = 200  # uplinks per scenario: 50 per device
STATUS_TOPIC = "nbiot/gateways/gw-test/status"


# -- helpers ------------------------------------------------------------------------------
async def send_uplinks(gw: Gateway, per_device: int, first_seq: int = 1) -> dict[str, list[int]]:
    """POST `per_device` uplinks from each enabled device, seq ascending, one at a time per
    device (devices in parallel); return the seqs answered 2.04, by device."""
    ctx = await aiocoap.Context.create_client_context()

    async def device_sends(device: Device) -> list[int]:
        acked = []
        for seq in range(first_seq, first_seq + per_device):
            body = {"seq": seq, **READING[device.device_type]}
            request = aiocoap.Message(code=aiocoap.POST, uri=gw.uri(device),
                                      payload=json.dumps(body).encode(), content_format=50)
            response = await ctx.request(request).response
            if response.code == aiocoap.CHANGED:
                acked.append(seq)
        return acked

    try:
        results = await asyncio.gather(*(device_sends(d) for d in SENDERS))
    finally:
        await ctx.shutdown()
    return {d.device_id: seqs for d, seqs in zip(SENDERS, results, strict=True)}


def delivered(sub: Subscription) -> dict[str, list[int]]:
    """Seqs the witness received, by device, in arrival order."""
    by_device: dict[str, list[int]] = {d.device_id: [] for d in SENDERS}
    for message in sub.messages("/up"):
        by_device[message["device_id"]].append(message["seq"])
    return by_device


def missing(acked: dict[str, list[int]], sub: Subscription) -> dict[str, set[int]]:
    """Acked seqs the witness has not seen (yet), by device; duplicates do not matter."""
    got = delivered(sub)
    return {d: set(seqs) - set(got[d]) for d, seqs in acked.items() if set(seqs) - set(got[d])}


def expected(per_device: int, first_seq: int = 1) -> dict[str, list[int]]:
    return {d.device_id: list(range(first_seq, first_seq + per_device)) for d in SENDERS}


def spool_rows(gw: Gateway) -> int:
    """Rows in the gateway's spool file, read directly (the gateway must not be running)."""
    with contextlib.closing(sqlite3.connect(gw.workdir / "spool.sqlite")) as db:
        count: int = db.execute("SELECT count(*) FROM records").fetchone()[0]
        return count


def retained(broker: Broker, topic: str) -> str | None:
    """The retained message on `topic` as a fresh subscriber sees it (None if there is none)."""
    result = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", topic,
         "--retained-only", "-C", "1", "-W", "2"],
        capture_output=True, timeout=10, check=False)
    return result.stdout.decode().strip() or None




def restart_broker_with_witness(gw: Gateway, broker: Broker,
                                subscribe: Callable[[str], Subscription]) -> Subscription:
    with paused(gw):
        broker.start()
        return subscribe("nbiot/#")


def connected(gw: Gateway) -> float:
    return gw.metric("nbiot_gateway_mqtt_connected")


def spool_records(gw: Gateway) -> float:
    return gw.metric("nbiot_gateway_spool_records")


# -- broker outage --------------------------------------------------------------------------
async def test_uplinks_acked_during_broker_outage_arrive_once_each_in_device_order(
    gateway: Gateway, broker: Broker, subscribe: Callable[[str], Subscription]
) -> None:
    wait_for(lambda: connected(gateway) == 1, what="gateway connected to the broker")
    broker.stop()
    wait_for(lambda: connected(gateway) == 0, what="gateway noticing the broker is gone")

    acked = await send_uplinks(gateway, N // len(SENDERS))

    assert acked == expected(N // len(SENDERS)), "every uplink must get 2.04 while spooling"
    assert spool_records(gateway) >= N
    sub = restart_broker_with_witness(gateway, broker, subscribe)
    sub.wait_count(N)
    wait_for(lambda: spool_records(gateway) == 0, what="spool drained")
    assert connected(gateway) == 1
    assert delivered(sub) == expected(N // len(SENDERS))  # once each, per-device order


# -- kill -9 --------------------------------------------------------------------------------
async def test_uplinks_acked_with_broker_down_survive_kill_9(
    gateway: Gateway, broker: Broker, subscribe: Callable[[str], Subscription]
) -> None:
    broker.stop()
    acked = await send_uplinks(gateway, N // len(SENDERS))
    spooled_before_crash = spool_records(gateway)

    gateway.kill()
    gateway.start()

    assert acked == expected(N // len(SENDERS))
    assert spool_records(gateway) == spooled_before_crash >= N
    sub = restart_broker_with_witness(gateway, broker, subscribe)
    sub.wait_count(N)
    wait_for(lambda: spool_records(gateway) == 0, what="spool drained")
    assert delivered(sub) == expected(N // len(SENDERS))


async def test_every_acked_uplink_arrives_when_killed_right_after_acking(
    gateway: Gateway, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("nbiot/#")
    acked = await send_uplinks(gateway, N // len(SENDERS))
    gateway.kill()  # at once: some records are typically still in flight to the broker

    gateway.start()

    assert acked == expected(N // len(SENDERS))

    wait_for(lambda: not missing(acked, sub), what="every acked seq on MQTT (duplicates allowed)")
    wait_for(lambda: spool_records(gateway) == 0, what="spool drained after the restart")


# -- SIGTERM --------------------------------------------------------------------------------
async def test_sigterm_drains_spool_exits_0_and_leaves_status_offline(
    gateway: Gateway, broker: Broker, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("nbiot/#")
    wait_for(lambda: retained(broker, STATUS_TOPIC) == "online", what="retained status online")
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGSTOP)  # the broker stalls: records pile up unacked
    try:
        acked = await send_uplinks(gateway, N // len(SENDERS))
        assert gateway.proc is not None
        gateway.proc.send_signal(signal.SIGTERM)
    finally:
        broker.proc.send_signal(signal.SIGCONT)

    exit_code = gateway.stop()

    assert exit_code == 0
    assert acked == expected(N // len(SENDERS))
    assert spool_rows(gateway) == 0
    assert delivered(sub) == expected(N // len(SENDERS))
    assert retained(broker, STATUS_TOPIC) == "offline"


async def test_sigterm_drain_timeout_keeps_unacked_records_for_next_start(
    gateway_factory: Callable[..., Gateway], broker: Broker,
    subscribe: Callable[[str], Subscription]
) -> None:
    gw = gateway_factory(NBIOT_GATEWAY__SHUTDOWN_GRACE_S="0.5")
    sub = subscribe("nbiot/#")
    wait_for(lambda: connected(gw) == 1, what="gateway connected to the broker")
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGSTOP)  # stalled past the grace time: nothing is acked
    try:
        acked = await send_uplinks(gw, N // len(SENDERS))
        exit_code = gw.stop()
        left_spooled = spool_rows(gw)
    finally:
        broker.proc.send_signal(signal.SIGCONT)

    assert exit_code == 0
    assert left_spooled >= N
    gw.start()
    wait_for(lambda: not missing(acked, sub), what="every acked seq on MQTT after the restart")


async def test_sigterm_without_grace_time_still_leaves_status_offline(
    gateway_factory: Callable[..., Gateway], broker: Broker
) -> None:
    gw = gateway_factory(NBIOT_GATEWAY__SHUTDOWN_GRACE_S="0")
    wait_for(lambda: retained(broker, STATUS_TOPIC) == "online", what="retained status online")
    await send_uplinks(gw, 5)

    exit_code = gw.stop()

    assert exit_code == 0
    assert retained(broker, STATUS_TOPIC) == "offline"


async def test_sigterm_with_broker_down_exits_0_and_keeps_records_for_next_start(
    gateway: Gateway, broker: Broker, subscribe: Callable[[str], Subscription]
) -> None:
    broker.stop()
    acked = await send_uplinks(gateway, N // len(SENDERS))
    spooled = spool_records(gateway)

    exit_code = gateway.stop()

    assert exit_code == 0
    assert "level=ERROR" not in gateway.log_path.read_text().split("stopping:", 1)[1]
    assert acked == expected(N // len(SENDERS))
    assert spool_rows(gateway) == spooled >= N
    gateway.start()
    assert spool_records(gateway) == spooled
    sub = restart_broker_with_witness(gateway, broker, subscribe)
    sub.wait_count(N)
    wait_for(lambda: spool_records(gateway) == 0, what="spool drained")
    assert delivered(sub) == expected(N // len(SENDERS))


def test_reconnect_backoff_stays_within_bounds_through_a_long_outage() -> None:
    backoff = Backoff(min_s=0.5, max_s=30.0)

    delays = [backoff.next_delay() for _ in range(5000)]  # ~1.5 days of retries at the cap

    assert min(delays) >= 0.5
    assert max(delays) <= 30.0


# -- the spool gauge across restarts --------------------------------------------------------
async def test_spool_gauge_after_restart_counts_only_unpublished_records(
    gateway: Gateway, broker: Broker, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("nbiot/#")
    await send_uplinks(gateway, 5)
    sub.wait_count(5 * len(SENDERS))
    wait_for(lambda: spool_records(gateway) == 0, what="first uplinks published")
    broker.stop()
    wait_for(lambda: connected(gateway) == 0, what="gateway noticing the broker is gone")
    await send_uplinks(gateway, 3, first_seq=6)
    assert gateway.stop() == 0

    gateway.start()

    assert spool_records(gateway) == 3 * len(SENDERS)
    assert gateway.metric("nbiot_gateway_spool_bytes") > 0


async def test_spool_left_by_an_earlier_version_is_still_published(
    gateway_factory: Callable[..., Gateway], subscribe: Callable[[str], Subscription]
) -> None:
    gw = gateway_factory(start=False)
    with contextlib.closing(sqlite3.connect(gw.workdir / "spool.sqlite")) as db, db:
        # The schema before retained records (liveness status) had their column.
        db.execute("CREATE TABLE records (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                   "topic TEXT NOT NULL, payload BLOB NOT NULL)")
        db.execute("INSERT INTO records (topic, payload) VALUES (?, ?)",
                   ("nbiot/plant/env_th/th-1/up", json.dumps({"device_id": "th-1", "seq": 41}).encode()))
    sub = subscribe("nbiot/#")

    gw.start()

    assert [m["seq"] for m in sub.wait_count(1)] == [41]
    wait_for(lambda: spool_records(gw) == 0, what="the old record deleted once acked")
