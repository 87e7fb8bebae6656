"""The lean MQTT 3.1.1 client against a real mosquitto: publish, acks, retain, will,
subscribe, refusal and a broker that goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.mqtt.client import MqttClient, MqttError, Will
from tests.conftest import Broker, Subscription, free_port, mosquitto_binary, popen_logged, wait_for


async def test_qos1_publishes_are_acked_once_each_and_delivered(
    broker: Broker, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("t/#")
    client = await MqttClient.connect("127.0.0.1", broker.port, client_id="t-pub")
    acked: list[int] = []
    all_acked = asyncio.Event()

    def on_ack(i: int) -> None:
        acked.append(i)
        if len(acked) == 500:
            all_acked.set()

    for i in range(500):
        client.publish(f"t/{i % 7}", b"m%d" % i, qos=1, on_ack=lambda i=i: on_ack(i))
    await asyncio.wait_for(all_acked.wait(), 20)
    await client.disconnect()

    assert sorted(acked) == list(range(500))
    wait_for(lambda: len([t for t, _ in sub.lines() if t.startswith("t/")]) >= 500)
    payloads = [p for t, p in sub.lines() if t.startswith("t/")]
    assert sorted(payloads) == sorted(f"m{i}" for i in range(500))


async def test_retained_message_reaches_a_later_subscriber(
    broker: Broker, subscribe: Callable[[str], Subscription]
) -> None:
    client = await MqttClient.connect("127.0.0.1", broker.port, client_id="t-ret")
    await client.publish_and_wait("r/status", b"online", qos=1, retain=True)
    await client.disconnect()

    sub = subscribe("r/#")

    assert wait_for(lambda: sub.lines() and [x for x in sub.lines() if x[0] == "r/status"]) == [
        ("r/status", "online")]


async def test_will_is_published_when_the_connection_breaks(
    broker: Broker, subscribe: Callable[[str], Subscription]
) -> None:
    sub = subscribe("w/#")
    client = await MqttClient.connect("127.0.0.1", broker.port, client_id="t-will",
                                      will=Will("w/status", b"offline", qos=1, retain=True))
    client.abort()  # no DISCONNECT: the broker must publish the will
    with pytest.raises(MqttError):
        await client.closed  # the socket is closed by the loop, not by abort() itself

    assert wait_for(lambda: [x for x in sub.lines() if x[0] == "w/status"]) == [
        ("w/status", "offline")]


async def test_subscription_receives_and_acks_qos1_messages(broker: Broker) -> None:
    listener = await MqttClient.connect("127.0.0.1", broker.port, client_id="t-sub")
    assert await listener.subscribe("d/+/down", qos=1) == 1
    sender = await MqttClient.connect("127.0.0.1", broker.port, client_id="t-send")
    await sender.publish_and_wait("d/dev1/down", b'{"id":"c1"}', qos=1)

    message = await asyncio.wait_for(listener.messages.get(), 10)

    assert (message.topic, message.payload) == ("d/dev1/down", b'{"id":"c1"}')
    await sender.disconnect()
    await listener.disconnect()


async def test_refused_credentials_raise_with_the_reason(tmp_path: Path) -> None:
    port = free_port()
    conf = tmp_path / "closed.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\n")
    proc = popen_logged([mosquitto_binary(), "-c", str(conf)], tmp_path / "closed.log")
    try:
        async def attempt() -> str:
            try:
                await MqttClient.connect("127.0.0.1", port, client_id="t-refused")
            except MqttError as e:
                return str(e)
            return "connected"

        message = ""
        for _ in range(100):  # the broker may still be starting: retry until it answers
            message = await attempt()
            if "refused the connection" in message:
                break
            await asyncio.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(5)

    assert message == "broker refused the connection: not authorized"


async def test_closed_completes_with_an_error_when_the_broker_stops(broker: Broker) -> None:
    client = await MqttClient.connect("127.0.0.1", broker.port, client_id="t-gone")

    broker.stop()

    with pytest.raises(MqttError, match="connection"):
        await asyncio.wait_for(client.closed, 10)
    with pytest.raises(MqttError):
        client.publish("t/x", b"late")
