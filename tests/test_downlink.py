"""Downlink to sleeping devices: a command published on MQTT waits durably, rides in the
2.04 of the device's next uplink, is confirmed by a later uplink's `ack`, or expires;
each state change is published on `.../down/ack`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiocoap
import pytest

from gateway.pipeline.registry import Device as RegistryDevice
from gateway.pipeline.registry import Registry
from gateway.store.downlink import Downlink, DownlinkStore
from gateway.store.spool import Spool
from tests.coap_raw import RawCoap, uplink_request
from tests.conftest import DEVICES, Broker, Gateway, Subscription
from tests.write_lock import write_locks

TH = DEVICES[0]
DOWN = f"nbiot/plant/{TH.device_type}/{TH.device_id}/down"


def publish_command(broker: Broker, command: dict[str, object] | bytes, topic: str = DOWN) -> None:
    payload = command if isinstance(command, bytes) else json.dumps(command).encode()
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                    "-t", topic, "-m", payload], check=True, timeout=10)


def states(sub: Subscription, n: int) -> list[tuple[str, str]]:
    return [(m["id"], m["state"]) for m in sub.wait_count(n, "/down/ack")]


def uplink(gateway: Gateway, body: dict[str, object]) -> aiocoap.Message:
    with RawCoap(gateway.coap_port) as device:
        return device.exchange(uplink_request(gateway.uri(TH), body))


def test_command_is_queued_delivered_in_the_reply_and_confirmed_by_ack(
    gateway: Gateway, broker: Broker, subscribe: Callable[[str], Subscription]
) -> None:
    acks = subscribe(f"{DOWN}/ack")
    publish_command(broker, {"id": "c1", "ttl_s": 3600, "set": {"report_interval_s": 30}})
    assert states(acks, 1) == [("c1", "queued")]

    carrying = uplink(gateway, {"seq": 1, "temperature": 20.0})
    confirming = uplink(gateway, {"seq": 2, "temperature": 20.5, "ack": "c1"})

    assert carrying.code == aiocoap.CHANGED
    assert carrying.opt.content_format == 50
    assert json.loads(carrying.payload) == {"id": "c1", "ttl_s": 3600,
                                            "set": {"report_interval_s": 30}, "pending": 0}
    assert confirming.code == aiocoap.CHANGED and confirming.payload == b""
    assert states(acks, 3) == [("c1", "queued"), ("c1", "delivered"), ("c1", "confirmed")]


def test_unconfirmed_command_is_sent_again_and_one_at_a_time_with_a_pending_count(
    gateway: Gateway, broker: Broker, subscribe: Callable[[str], Subscription]
) -> None:
    acks = subscribe(f"{DOWN}/ack")
    publish_command(broker, {"id": "a", "set": {"x": 1}})
    publish_command(broker, {"id": "b", "set": {"x": 2}})
    states(acks, 2)

    first = json.loads(uplink(gateway, {"seq": 1, "temperature": 20.0}).payload)
    again = json.loads(uplink(gateway, {"seq": 2, "temperature": 20.0}).payload)
    after_ack = json.loads(uplink(gateway, {"seq": 3, "temperature": 20.0, "ack": "a"}).payload)

    assert (first["id"], first["pending"]) == ("a", 1)
    assert (again["id"], again["pending"]) == ("a", 1)  # the reply may have been lost
    assert (after_ack["id"], after_ack["pending"]) == ("b", 0)


def test_queued_command_survives_a_gateway_restart(
    gateway: Gateway, broker: Broker, subscribe: Callable[[str], Subscription]
) -> None:
    acks = subscribe(f"{DOWN}/ack")
    publish_command(broker, {"id": "keep", "set": {"report_interval_s": 300}})
    states(acks, 1)
    assert gateway.stop() == 0

    gateway.start()
    reply = uplink(gateway, {"seq": 1, "temperature": 20.0})

    assert json.loads(reply.payload)["id"] == "keep"


def test_command_not_confirmed_in_its_ttl_expires(
    gateway_factory: Callable[..., Gateway], broker: Broker,
    subscribe: Callable[[str], Subscription],
) -> None:
    gateway_factory(NBIOT_LIVENESS__CHECK_INTERVAL_S="0.2")
    acks = subscribe(f"{DOWN}/ack")

    publish_command(broker, {"id": "short", "ttl_s": 0.5, "set": {}})

    assert states(acks, 2) == [("short", "queued"), ("short", "expired")]


def test_bad_commands_are_rejected_with_a_reason(
    gateway: Gateway, broker: Broker, subscribe: Callable[[str], Subscription]
) -> None:
    acks = subscribe("nbiot/plant/+/+/down/ack")
    publish_command(broker, b"not json")
    publish_command(broker, {"set": {}})  # no id
    publish_command(broker, {"id": "x"}, topic="nbiot/plant/env_th/nobody/down")

    rejected = acks.wait_count(3, "/down/ack")

    assert [m["state"] for m in rejected] == ["rejected"] * 3
    assert [m["reason"] for m in rejected] == [
        "not JSON", 'needs an "id": a string of 1 to 64 characters', "no device nobody of type env_th"]
    assert uplink(gateway, {"seq": 1, "temperature": 20.0}).payload == b""


def test_command_published_while_the_gateway_is_stopped_waits_in_the_broker(
    gateway: Gateway, broker: Broker, subscribe: Callable[[str], Subscription]
) -> None:
    acks = subscribe(f"{DOWN}/ack")
    assert gateway.stop() == 0  # its session (and subscription) stays in the broker

    publish_command(broker, {"id": "while-away", "set": {"report_interval_s": 120}})
    gateway.start()

    assert states(acks, 1) == [("while-away", "queued")]
    assert json.loads(uplink(gateway, {"seq": 1, "temperature": 20.0}).payload)["id"] == \
        "while-away"


def test_a_confirmed_commands_id_can_be_used_again_and_survives_a_restart(
    gateway: Gateway, broker: Broker, subscribe: Callable[[str], Subscription]
) -> None:
    acks = subscribe(f"{DOWN}/ack")
    publish_command(broker, {"id": "same", "set": {"x": 1}})
    states(acks, 1)
    uplink(gateway, {"seq": 1, "temperature": 20.0})
    uplink(gateway, {"seq": 2, "temperature": 20.0, "ack": "same"})
    publish_command(broker, {"id": "same", "set": {"x": 2}})
    states(acks, 4)  # queued, delivered, confirmed, queued again
    assert gateway.stop() == 0

    gateway.start()

    assert json.loads(uplink(gateway, {"seq": 3, "temperature": 20.0}).payload)["set"] == {"x": 2}


# -- in process: what is stored before it counts ------------------------------------------
TOPIC_BASE = "nbiot/plant"


@contextlib.asynccontextmanager
async def downlink_on_disk(tmp_path: Path) -> AsyncIterator[tuple[Downlink, Spool, Path]]:
    """A Downlink over real files: its SQLite store and a spool, one device (TH)."""
    registry = Registry([RegistryDevice(TH.device_id, TH.device_type, TH.token, 60)])
    path = tmp_path / "downlink.sqlite"
    async with Spool(tmp_path / "spool.sqlite", 1 << 30) as spool:
        downlink = Downlink(registry, DownlinkStore(path), spool, TOPIC_BASE)
        await downlink.load()
        try:
            yield downlink, spool, path
        finally:
            await downlink.close()


def command(command_id: str) -> bytes:
    return json.dumps({"id": command_id, "set": {"x": 1}}).encode()


async def spooled_states(spool: Spool) -> list[tuple[str, str]]:
    await spool.wait_committed()
    return [(m["id"], m["state"]) for m in map(json.loads, (r.payload for r in
                                                            await spool.read_after(0, 1000)))]


async def test_a_command_rides_only_once_it_is_stored(tmp_path: Path) -> None:
    async with downlink_on_disk(tmp_path) as (downlink, _, path):
        with write_locks(path) as (lock,):
            lock.acquire()
            receiving = asyncio.create_task(
                downlink.receive(TH.device_type, TH.device_id, command("c1")))
            await asyncio.sleep(0)  # receive() starts; its commit cannot end while locked
            while_locked = downlink.next_for(TH.device_id, TH.device_type, time.time())
            lock.release()
            await receiving
        stored = DownlinkStore(path).load()

        assert while_locked is None
        assert json.loads(downlink.next_for(TH.device_id, TH.device_type, time.time()) or b"")[
            "id"] == "c1"
        assert [c.command_id for c in stored] == ["c1"]


async def test_confirmations_call_back_only_once_stored_and_are_spooled(
    tmp_path: Path,
) -> None:
    ids = [f"c{i}" for i in range(20)]
    async with downlink_on_disk(tmp_path) as (downlink, spool, path):
        for command_id in ids:
            await downlink.receive(TH.device_type, TH.device_id, command(command_id))
        answered: list[str] = []
        all_answered = asyncio.Event()

        def then(command_id: str) -> Callable[[], None]:
            def answer() -> None:
                answered.append(command_id)
                if len(answered) == len(ids):
                    all_answered.set()
            return answer

        with write_locks(path) as (lock,):
            lock.acquire()
            for command_id in ids:
                downlink.confirm(TH.device_id, TH.device_type, command_id, then(command_id))
            await asyncio.sleep(0)  # the commit starts; it cannot end while the lock is held
            answered_while_locked = list(answered)
            riding_while_locked = downlink.next_for(TH.device_id, TH.device_type, time.time())
            lock.release()
            await asyncio.wait_for(all_answered.wait(), 10)
        store = DownlinkStore(path)
        waiting, confirmed = store.load(), store.load_confirmed()
        states = await spooled_states(spool)
        await downlink.save()  # `confirmed` is durable in the spool: the rows can go

        assert answered_while_locked == [] and riding_while_locked is None
        assert sorted(answered) == sorted(ids)
        assert waiting == [] and sorted(c.command_id for c in confirmed) == sorted(ids)
        assert [s for s in states if s[1] == "confirmed"] == [(c, "confirmed") for c in ids]
        assert store.load_confirmed() == []


async def test_a_confirmation_that_cannot_be_stored_leaves_the_command_waiting(
    tmp_path: Path,
) -> None:
    async with downlink_on_disk(tmp_path) as (downlink, spool, path):
        await downlink.receive(TH.device_type, TH.device_id, command("c1"))
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("CREATE TRIGGER refuse BEFORE UPDATE ON commands "
                       "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
        answered = asyncio.Event()

        downlink.confirm(TH.device_id, TH.device_type, "c1", answered.set)
        await asyncio.wait_for(answered.wait(), 10)

        riding = downlink.next_for(TH.device_id, TH.device_type, time.time())
        assert json.loads(riding or b"")["id"] == "c1"  # the device acknowledges it again
        assert [c.command_id for c in DownlinkStore(path).load()] == ["c1"]
        assert ("c1", "confirmed") not in await spooled_states(spool)


async def test_a_command_that_cannot_be_stored_is_not_queued_and_raises(tmp_path: Path) -> None:
    async with downlink_on_disk(tmp_path) as (downlink, spool, path):
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("CREATE TRIGGER refuse BEFORE INSERT ON commands "
                       "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")

        with pytest.raises(sqlite3.Error):  # not acknowledged to the broker: it comes again
            await downlink.receive(TH.device_type, TH.device_id, command("c1"))

        assert downlink.next_for(TH.device_id, TH.device_type, time.time()) is None
        assert await spooled_states(spool) == []


async def test_a_confirmed_id_used_again_at_once_keeps_both_rows_apart(tmp_path: Path) -> None:
    """The new command may take the id while the old one's `confirmed` is not yet spooled:
    the confirmed row moved to a key of its own, so neither overwrites the other."""
    async with downlink_on_disk(tmp_path) as (downlink, _, path):
        await downlink.receive(TH.device_type, TH.device_id, command("same"))
        answered = asyncio.Event()
        with write_locks(tmp_path / "spool.sqlite") as (spool_lock,):
            spool_lock.acquire()  # `confirmed` stays out of the spool file meanwhile
            downlink.confirm(TH.device_id, TH.device_type, "same", answered.set)
            await asyncio.wait_for(answered.wait(), 10)
            await downlink.receive(TH.device_type, TH.device_id, b'{"id": "same", "v": 2}')
            store = DownlinkStore(path)
            waiting, confirmed = store.load(), store.load_confirmed()

        assert [(c.command_id, c.body.get("v")) for c in waiting] == [("same", 2)]
        assert [(c.command_id, c.device_id) for c in confirmed] == [("same", TH.device_id)]
