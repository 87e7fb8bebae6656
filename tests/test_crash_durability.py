"""What the gateway promises to remember is on disk at the moment it says so, not only once a
clean stop has saved everything: each test ends the gateway with kill -9 right after the
promise was given (a 2.04, a PUBACK) and checks the restarted gateway still keeps it.

Where the window between the promise and a later write is too short to hit by chance, the
test holds SQLite's write lock on the gateway's file (tests/write_lock.py), so the kill
lands in that window every time. No mocks: a real mosquitto, the real gateway subprocess,
real UDP."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import aiocoap
import pytest

from gateway.tools.localstack import free_port
from tests.coap_raw import RawCoap, uplink_request
from tests.conftest import DEVICES, Broker, Gateway, Subscription, wait_for
from tests.test_downlink import publish_command, states
from tests.write_lock import write_locks

TH = DEVICES[0]
GATEWAY_CLIENT_ID = "nbiot-gateway-gw-test"  # mqtt.client_id for gateway.id "gw-test"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """mosquitto logging every packet, so a test sees when the gateway PUBACKs a command."""
    workdir = tmp_path / "broker"
    workdir.mkdir()
    b = Broker(free_port(), workdir, conf_extra="log_type all\n")
    b.start()
    yield b
    b.stop()


def send_uplink(gateway: Gateway, body: dict[str, object]) -> aiocoap.Message:
    with RawCoap(gateway.coap_port) as device:  # a new source port each time
        return device.exchange(uplink_request(gateway.uri(TH), body))


def reply_already_sent(device: RawCoap) -> aiocoap.Message | None:
    """A reply waiting in the socket, without waiting for one."""
    device.sock.setblocking(False)
    try:
        return aiocoap.Message.decode(device.sock.recv(65535))
    except BlockingIOError:
        return None


def ack_states(sub: Subscription) -> list[tuple[str, str]]:
    return [(m["id"], m["state"]) for m in sub.messages("/down/ack")]


def uplink_published(sub: Subscription, seq: int) -> bool:
    return any(m.get("seq") == seq and m["device_id"] == TH.device_id for m in sub.messages())


# -- replay state ---------------------------------------------------------------------------
def test_an_acked_seq_retried_after_kill_9_is_a_duplicate_not_published_again(
    gateway: Gateway,
) -> None:
    # Checked: with the spool's device_seqs upsert taken out of its commit (gateway/store/spool.py
    # `_commit`), the retry is accepted as new (accepted 1, duplicate 0) and this fails.
    first = send_uplink(gateway, {"seq": 7, "temperature": 20.0})
    assert first.code == aiocoap.CHANGED

    gateway.kill()  # no shutdown: only what each commit wrote is on disk
    gateway.start()
    retry = send_uplink(gateway, {"seq": 7, "temperature": 20.0})  # from a new NAT port

    assert retry.code == aiocoap.CHANGED
    assert gateway.metric("nbiot_gateway_uplinks_duplicate_total") == 1
    assert gateway.metric("nbiot_gateway_uplinks_accepted_total") == 0  # not spooled again


# -- downlink: stored before PUBACK -----------------------------------------------------------
def test_a_command_the_gateway_acknowledged_to_the_broker_survives_kill_9(
    gateway: Gateway, broker: Broker,
) -> None:
    # Checked: with receive() not waiting for its commit and the commit put off by 2 s, the
    # PUBACK goes out first, the broker never sends the command again, and this fails.
    pubacks = broker.log_path.read_text().count(f"Received PUBACK from {GATEWAY_CLIENT_ID}")
    publish_command(broker, {"id": "keep", "set": {"report_interval_s": 300}})
    wait_for(lambda: broker.log_path.read_text().count(
        f"Received PUBACK from {GATEWAY_CLIENT_ID}") > pubacks,
        what="the gateway's PUBACK of the command")

    gateway.kill()  # the broker has let go of the command: only the gateway's file has it
    gateway.start()
    reply = send_uplink(gateway, {"seq": 1, "temperature": 20.0})

    assert reply.code == aiocoap.CHANGED
    assert reply.payload, "the command the gateway acknowledged to the broker is lost"
    assert json.loads(reply.payload)["id"] == "keep"


# -- downlink: confirmation -----------------------------------------------------------------
def deliver_command(gateway: Gateway, broker: Broker, sub: Subscription) -> None:
    publish_command(broker, {"id": "c1", "set": {"x": 1}})
    assert states(sub, 1) == [("c1", "queued")]
    carrying = send_uplink(gateway, {"seq": 1, "temperature": 20.0})
    assert json.loads(carrying.payload)["id"] == "c1"


def waiting_command_rows(gateway: Gateway) -> int:
    with contextlib.closing(sqlite3.connect(gateway.workdir / "downlink.sqlite")) as db:
        (rows,) = db.execute("SELECT count(*) FROM commands WHERE device_id = ? AND "
                             "command_id = 'c1'", (TH.device_id,)).fetchone()
    return int(rows)


def test_a_confirmation_answered_2_04_survives_kill_9_and_is_published(
    gateway: Gateway, broker: Broker, subscribe: Callable[[str], Subscription]
) -> None:
    """The 2.04 answering the confirming uplink is the promise: after it, a kill -9 must
    neither let the command ride again nor lose its `confirmed`. The kill lands after the
    2.04, before `confirmed` reaches the spool file (its commit is held back)."""
    # Checked: with today's pipeline (confirm() without a callback, the 2.04 at once) the
    # 2.04 arrives while the downlink file is locked, the kill leaves the command waiting,
    # and it rides again: this fails. With the pipeline change and DownlinkStore.
    # load_confirmed() returning nothing, `confirmed` is never published: this fails.
    sub = subscribe("nbiot/#")
    deliver_command(gateway, broker, sub)
    spool, downlink = gateway.workdir / "spool.sqlite", gateway.workdir / "downlink.sqlite"
    with RawCoap(gateway.coap_port) as device, write_locks(downlink, spool) as (dl, sp):
        dl.acquire()
        device.send(uplink_request(gateway.uri(TH), {"seq": 2, "temperature": 20.0, "ack": "c1"}))
        # Published means committed, and the pipeline has asked downlink to confirm.
        wait_for(lambda: uplink_published(sub, 2), what="the confirming uplink on MQTT")
        early = reply_already_sent(device)  # a 2.04 before the confirmation is stored
        reply = early
        sp.acquire()  # from here `confirmed` cannot reach the spool file
        if early is None:
            dl.release()
            reply = device.receive()
        gateway.kill()

    gateway.start()
    after = send_uplink(gateway, {"seq": 3, "temperature": 20.0})

    assert after.payload == b"", (
        "the confirmed command rode again after the crash"
        + (": its 2.04 went out before the confirmation was stored" if early else ""))
    assert (reply.code, reply.payload) == (aiocoap.CHANGED, b"")
    wait_for(lambda: ("c1", "confirmed") in ack_states(sub), what="`confirmed` on MQTT")


def test_a_stored_confirmation_is_published_after_kill_9_though_the_spool_never_had_it(
    gateway: Gateway, broker: Broker, subscribe: Callable[[str], Subscription]
) -> None:
    """The confirmation is stored (the command's waiting row is gone from the file), its
    `confirmed` is held out of the spool file, kill -9: the restarted gateway publishes
    `confirmed` and the command does not ride again."""
    # Checked: with DownlinkStore.load_confirmed() returning nothing, `confirmed` is never
    # published and this fails; with the confirmation a plain DELETE of the row, too.
    sub = subscribe("nbiot/#")
    deliver_command(gateway, broker, sub)
    spool, downlink = gateway.workdir / "spool.sqlite", gateway.workdir / "downlink.sqlite"
    with RawCoap(gateway.coap_port) as device, write_locks(downlink, spool) as (dl, sp):
        dl.acquire()
        device.send(uplink_request(gateway.uri(TH), {"seq": 2, "temperature": 20.0, "ack": "c1"}))
        wait_for(lambda: uplink_published(sub, 2), what="the confirming uplink on MQTT")
        sp.acquire()
        dl.release()
        wait_for(lambda: waiting_command_rows(gateway) == 0, what="the confirmation stored")
        gateway.kill()

    gateway.start()
    after = send_uplink(gateway, {"seq": 3, "temperature": 20.0})

    assert after.payload == b"", "the confirmed command rode again after the crash"
    wait_for(lambda: ("c1", "confirmed") in ack_states(sub), what="`confirmed` on MQTT")
