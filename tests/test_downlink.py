"""Downlink to sleeping devices: a command published on MQTT waits durably, rides in the
2.04 of the device's next uplink, is confirmed by a later uplink's `ack`, or expires;
each state change is published on `.../down/ack`."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

import aiocoap

from tests.coap_raw import RawCoap, uplink_request
from tests.conftest import DEVICES, Broker, Gateway, Subscription

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
