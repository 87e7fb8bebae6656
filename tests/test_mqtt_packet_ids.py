"""MQTT packet ids of the lean client (gateway/mqtt/client.py) past 65,535 publishes, against a real
mosquitto whose debug log is the witness of what went over the wire: which packet id each
PUBLISH carried, and which PUBACK the broker sent back. Ids must wrap, never be 0, never be
in flight twice, and each PUBACK must resolve exactly the publish it belongs to.

mosquitto acknowledges QoS 1 in order, so PUBACKs out of order are fed to the client's
protocol by the test (its reading of the broker's socket paused): its bookkeeping of ids is
then tested on its own, with the broker still telling which id each publish got."""

from __future__ import annotations

import asyncio
import os
import random
import re
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.mqtt.client import MqttClient, MqttError
from gateway.tools.localstack import free_port
from tests.conftest import mosquitto_binary, popen_logged, wait_for

MAX_PACKET_ID = 65535
DEADLINE_S = 30.0


@dataclass
class LoggingBroker:
    """mosquitto logging every packet (`log_type all`) to a file it flushes line by line."""

    port: int
    log_path: Path


@pytest.fixture
async def logging_broker(tmp_path: Path) -> AsyncIterator[LoggingBroker]:
    port = free_port()
    log_path = tmp_path / "mosquitto-packets.log"
    conf = tmp_path / "mosquitto.conf"
    # As root mosquitto would drop to user "mosquitto", who cannot write into tmp_path.
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"{user}listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"log_dest file {log_path}\nlog_type all\n")
    proc = popen_logged([mosquitto_binary(), "-c", str(conf)], tmp_path / "mosquitto.out")
    wait_for(lambda: log_path.exists() and "running" in log_path.read_text(),
             what="mosquitto running")
    yield LoggingBroker(port, log_path)
    proc.terminate()
    proc.wait(10)


_PUBLISH = re.compile(r"Received PUBLISH from (\S+) \(d\d, q1, r\d, m(\d+), '([^']*)'")
_PUBACK = re.compile(r"Sending PUBACK to (\S+) \(m(\d+),")


def wire_events(broker: LoggingBroker, client_id: str) -> list[tuple[str, int, str]]:
    """("publish", packet id, topic) and ("puback", packet id, "") in the broker's order."""
    events = []
    for line in broker.log_path.read_text().splitlines():
        if (m := _PUBLISH.search(line)) and m.group(1) == client_id:
            events.append(("publish", int(m.group(2)), m.group(3)))
        elif (m := _PUBACK.search(line)) and m.group(1) == client_id:
            events.append(("puback", int(m.group(2)), ""))
    return events


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll with a deadline, letting the event loop (and the client's writes) run."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {DEADLINE_S}s waiting for {what}")
        await asyncio.sleep(0.01)


def count(broker: LoggingBroker, client_id: str, kind: str) -> int:
    return sum(1 for k, _, _ in wire_events(broker, client_id) if k == kind)


# -- in order, through a real broker -------------------------------------------------------
async def test_past_65535_publishes_ids_wrap_and_each_puback_resolves_its_own_publish(
    logging_broker: LoggingBroker,
) -> None:
    total, window = MAX_PACKET_ID + 5000, 20000
    client = await MqttClient.connect("127.0.0.1", logging_broker.port, client_id="t-wrap")
    resolved: list[str] = []  # topics, in the order their on_ack ran
    all_acked = asyncio.Event()
    published = 0

    def publish_next() -> None:
        nonlocal published
        topic = f"w/{published}"
        published += 1
        client.publish(topic, b"", qos=1, on_ack=lambda: on_ack(topic))

    def on_ack(topic: str) -> None:
        resolved.append(topic)
        if published < total:
            publish_next()  # keep `window` in flight, as the publisher does
        elif len(resolved) == total:
            all_acked.set()

    for _ in range(window):
        publish_next()
    await until(lambda: all_acked.is_set() or client.closed.done(), "a PUBACK for every publish")
    assert not client.closed.done(), f"the broker closed the connection: {client.closed.exception()}"
    in_flight_after = client.in_flight
    await client.disconnect()
    await until(lambda: count(logging_broker, "t-wrap", "puback") == total, "the broker's log")

    in_flight: dict[int, str] = {}
    acked_by_broker: list[str] = []  # the publish each PUBACK belongs to, by its packet id
    ids_used: list[int] = []
    for kind, packet_id, topic in wire_events(logging_broker, "t-wrap"):
        if kind == "publish":
            assert packet_id not in in_flight, f"packet id {packet_id} in flight twice"
            in_flight[packet_id] = topic
            ids_used.append(packet_id)
        else:
            acked_by_broker.append(in_flight.pop(packet_id))
    assert len(ids_used) == total and min(ids_used) >= 1 and max(ids_used) == MAX_PACKET_ID
    assert len(set(ids_used)) == MAX_PACKET_ID  # every id, then again: wrapped
    assert resolved == acked_by_broker
    assert sorted(resolved) == sorted(f"w/{i}" for i in range(total))
    assert in_flight_after == 0 and not in_flight


# -- out of order: the client's id bookkeeping on its own ------------------------------------
def pubacks(packet_ids: list[int]) -> bytes:
    return b"".join(struct.pack("!BBH", 0x40, 2, packet_id) for packet_id in packet_ids)


def feed(client: MqttClient, data: bytes, rng: random.Random) -> None:
    """Hand `data` to the client as the socket would: in pieces cut anywhere (a PUBACK may
    arrive split), with a PINGRESP between some of them."""
    pos = 0
    while pos < len(data):
        size = rng.randint(1, 64)
        piece = data[pos:pos + size]
        pos += size
        client.data_received(piece)
        if rng.random() < 0.05 and pos % 4 == 0:  # between two PUBACKs
            client.data_received(b"\xd0\x00")


async def test_pubacks_out_of_order_resolve_their_own_publish_and_free_only_their_ids(
    logging_broker: LoggingBroker,
) -> None:
    rng = random.Random(13)
    client = await MqttClient.connect("127.0.0.1", logging_broker.port, client_id="t-order")
    assert client._transport is not None
    client._transport.pause_reading()  # the broker's own, in-order PUBACKs stay in the socket
    resolved: list[str] = []

    def publish(topic: str) -> None:
        client.publish(topic, b"", qos=1, on_ack=lambda: resolved.append(topic))

    def topics_by_id() -> dict[int, str]:
        """The publish each packet id in flight belongs to, as the broker received them."""
        by_id: dict[int, str] = {}
        for kind, packet_id, topic in wire_events(logging_broker, "t-order"):
            if kind == "publish":
                by_id[packet_id] = topic
        return by_id

    try:
        for i in range(MAX_PACKET_ID):
            publish(f"a/{i}")
        with pytest.raises(MqttError, match="all 65535 packet ids are in flight"):
            publish("a/one-too-many")
        await until(lambda: count(logging_broker, "t-order", "publish") == MAX_PACKET_ID,
                    "65535 PUBLISHes at the broker")
        first_ids = topics_by_id()
        assert sorted(first_ids) == list(range(1, MAX_PACKET_ID + 1))  # never 0, each once

        freed = rng.sample(range(1, MAX_PACKET_ID + 1), 3000)
        feed(client, pubacks(freed), rng)
        resolved_first = list(resolved)
        feed(client, pubacks([0, *freed[:100]]), rng)  # unknown and already resolved ids
        resolved_again = resolved[len(resolved_first):]
        for j in range(len(freed)):
            publish(f"b/{j}")
        with pytest.raises(MqttError, match="all 65535 packet ids are in flight"):
            publish("b/one-too-many")
        await until(lambda: count(logging_broker, "t-order", "publish") == MAX_PACKET_ID + 3000,
                    "3000 more PUBLISHes at the broker")
        publishes = [(packet_id, topic) for kind, packet_id, topic
                     in wire_events(logging_broker, "t-order") if kind == "publish"]
        reused = dict(publishes[MAX_PACKET_ID:])

        in_flight_ids = list(range(1, MAX_PACKET_ID + 1))
        rng.shuffle(in_flight_ids)
        resolved.clear()
        feed(client, pubacks(in_flight_ids), rng)
        now_by_id = topics_by_id()
        in_flight_after = client.in_flight
    finally:
        client.abort()
        with pytest.raises(MqttError):
            await client.closed

    assert resolved_first == [first_ids[i] for i in freed]
    assert resolved_again == []
    assert sorted(reused) == sorted(freed)  # exactly the freed ids were given out again
    assert resolved == [now_by_id[i] for i in in_flight_ids]
    assert sorted(resolved_first + resolved) == sorted(
        [f"a/{i}" for i in range(MAX_PACKET_ID)] + [f"b/{j}" for j in range(3000)])
    assert in_flight_after == 0
