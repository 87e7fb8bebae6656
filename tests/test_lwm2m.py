"""The LwM2M server against a real gateway and mosquitto: a device on one raw UDP socket
(aiocoap's codec, so our own is not testing itself) registers, Sends, is observed and
answers commands that came through MQTT; registrations and commands survive kill -9."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import subprocess
import time
from collections.abc import Callable
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.types import Type

from gateway.ingest.coap import numbers as C
from gateway.ingest.coap import wire
from gateway.ingest.lwm2m.requests import Requester
from tests.coap_raw import RawCoap, uplink_request
from tests.conftest import DEVICES, Broker, Gateway, Subscription, wait_for

TH, OFF = DEVICES[0], DEVICES[4]
UP = f"nbiot/plant/env_th/{TH.device_id}"
OBJECTS = b'</>;rt="oma.lwm2m",</1/0>,</3/0>,</3303/0>,</3304/0>'
LWM2M = '[lwm2m]\nenabled = true\nallow_nosec = true\nawake_s = 2.0\n'


def publish(broker: Broker, topic: str, body: dict[str, Any]) -> None:
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                    "-t", topic, "-m", json.dumps(body)], check=True, timeout=10)


class Device(RawCoap):
    """An LwM2M client: requests out, and the gateway's requests answered by `handler`."""

    def register(self, ep: str = TH.device_id, query: str = "lt=300&lwm2m=1.1&b=UQ",
                 objects: bytes = OBJECTS) -> aiocoap.Message:
        request = uplink_request(f"coap://{self.server[0]}:{self.server[1]}/rd?ep={ep}&{query}",
                                 objects, content_format=40)
        return self.exchange(request)

    def send_readings(self, records: list[dict[str, Any]], content_format: int = 110
                      ) -> aiocoap.Message:
        body = json.dumps(records).encode() if content_format == 110 else cbor2.dumps(records)
        return self.exchange(uplink_request(f"coap://{self.server[0]}:{self.server[1]}/dp",
                                            body, content_format=content_format))

    def update(self, ep: str = TH.device_id, method: aiocoap.Code = aiocoap.POST
               ) -> aiocoap.Message:
        return self.exchange(uplink_request(
            f"coap://{self.server[0]}:{self.server[1]}/rd/{ep}", b"", content_format=None,
            code=method))

    def next_request(self, timeout: float = 10.0) -> aiocoap.Message:
        """The gateway's next request to this device (ACKs and responses skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.receive(max(0.1, deadline - time.monotonic()))
            if msg.code.is_request():
                return msg

    def answer(self, request: aiocoap.Message, code: aiocoap.Code, payload: bytes = b"",
               content_format: int | None = None, observe: int | None = None) -> None:
        reply = message(code, payload, Type.ACK, request.mid, request.token)
        if content_format is not None:
            reply.opt.content_format = content_format
        if observe is not None:
            reply.opt.observe = observe
        self.send(reply)


def message(code: aiocoap.Code, payload: bytes, mtype: Type, mid: int, token: bytes
            ) -> aiocoap.Message:
    msg = aiocoap.Message(code=code, payload=payload)
    msg.mtype, msg.mid, msg.token = mtype, mid, token
    return msg


def path_of(msg: aiocoap.Message) -> str:
    return "/" + "/".join(msg.opt.uri_path)


@pytest.fixture
def lwm2m_gateway(gateway_factory: Callable[..., Gateway]) -> Gateway:
    return gateway_factory(LWM2M)


def test_register_then_send_reaches_mqtt_with_fields_and_unmapped_resources(
        lwm2m_gateway: Gateway, subscribe: Callable[[str], Subscription]) -> None:
    sub = subscribe("nbiot/#")
    with Device(lwm2m_gateway.coap_port) as device:
        reply = device.register(query="lt=300&lwm2m=1.1&b=UQ")
        assert reply.code == aiocoap.CREATED
        assert list(reply.opt.location_path) == ["rd", TH.device_id]
        reply = device.send_readings([{"bn": "/3303/0/", "n": "5700", "v": 21.5, "bt": 1_796_000_000},
                             {"bn": "/3304/0/", "n": "5700", "v": 40},
                             {"bn": "/3/0/", "n": "9", "v": 87}])
        assert reply.code == aiocoap.CHANGED, reply.payload
        with pytest.raises(TimeoutError):  # a 1.1 device Sends: it is not observed
            device.next_request(timeout=0.5)
    message = sub.wait_count(1, f"{TH.device_id}/up")[0]
    assert message["transport"] == "lwm2m"
    assert message["readings"] == {"temperature": {"value": 21.5, "unit": "Cel"},
                                   "humidity": {"value": 40.0, "unit": "%RH"}}
    assert message["resources"] == {"/3/0/9": 87}
    assert message["device_time"].startswith("2026-")
    assert lwm2m_gateway.metric("nbiot_gateway_lwm2m_registrations") == 1
    assert lwm2m_gateway.metric("nbiot_gateway_lwm2m_unmapped_resources_total") == 1


def test_send_in_senml_cbor_and_a_duplicate_through_a_new_port(
        lwm2m_gateway: Gateway, subscribe: Callable[[str], Subscription]) -> None:
    sub = subscribe(f"{UP}/up")
    records = [{-2: "/3303/0/5700", 2: 19.0, -3: 1_796_000_100}]
    with Device(lwm2m_gateway.coap_port) as device:
        assert device.register(query="lt=300&lwm2m=1.1&b=U").code == aiocoap.CREATED
        assert device.send_readings(records, 112).code == aiocoap.CHANGED
        port = device.sock.getsockname()[1]
    with Device(lwm2m_gateway.coap_port) as moved:
        # Send names no device: from an address with no registration it is refused...
        assert moved.send_readings(records, 112).code == aiocoap.FORBIDDEN
        # ...until the device Updates from there; then the same reading is a duplicate.
        assert moved.update().code == aiocoap.CHANGED
        assert moved.sock.getsockname()[1] != port
        assert moved.send_readings(records, 112).code == aiocoap.CHANGED
    time.sleep(0.5)
    assert [m["seq"] for m in sub.messages()] == [1_796_000_100_000]


def test_registration_survives_kill_9(lwm2m_gateway: Gateway,
                                      subscribe: Callable[[str], Subscription]) -> None:
    sub = subscribe(f"{UP}/up")
    with Device(lwm2m_gateway.coap_port) as device:
        assert device.register(query="lt=300&lwm2m=1.1&b=U").code == aiocoap.CREATED
        lwm2m_gateway.kill()
        lwm2m_gateway.start()
        assert lwm2m_gateway.metric("nbiot_gateway_lwm2m_registrations") == 1
        # no Register again: a Send from the registered address is taken
        reply = device.send_readings([{"n": "/3303/0/5700", "v": 20.5, "t": 1_796_000_200}])
        assert reply.code == aiocoap.CHANGED, reply.payload
    assert sub.wait_count(1)[0]["readings"]["temperature"]["value"] == 20.5


@pytest.mark.parametrize(("ep", "query", "objects", "code", "reason"), [
    ("nobody", "lt=300", OBJECTS, aiocoap.FORBIDDEN, "unknown_device"),
    (OFF.device_id, "lt=300", OBJECTS, aiocoap.FORBIDDEN, "device_disabled"),
    (TH.device_id, "lt=5", OBJECTS, aiocoap.BAD_REQUEST, "bad_lifetime"),
    (TH.device_id, "lt=300&lwm2m=2.0", OBJECTS, aiocoap.PRECONDITION_FAILED, "unsupported_version"),
    (TH.device_id, "lt=300&b=S", OBJECTS, aiocoap.BAD_REQUEST, "bad_binding"),
    (TH.device_id, "lt=300", b"</3303/0/5700/1/2>", aiocoap.BAD_REQUEST, "bad_object_list"),
    (TH.device_id, "lt=300", b"", aiocoap.BAD_REQUEST, "bad_object_list"),
])
def test_bad_registrations_get_4xx_counted_and_kept(
        lwm2m_gateway: Gateway, subscribe: Callable[[str], Subscription], ep: str, query: str,
        objects: bytes, code: aiocoap.Code, reason: str) -> None:
    sub = subscribe("nbiot/plant/invalid")
    with Device(lwm2m_gateway.coap_port) as device:
        reply = device.register(ep, query, objects)
    assert reply.code == code, reply.payload
    assert reply.payload  # a diagnostic
    letter = sub.wait_count(1, "invalid")[0]
    assert letter["reason"] == reason and letter["transport"] == "lwm2m"
    assert lwm2m_gateway.metric("nbiot_gateway_uplinks_rejected_total", {"reason": reason}) == 1
    assert lwm2m_gateway.metric("nbiot_gateway_lwm2m_registrations") == 0


def test_plain_udp_registration_is_refused_unless_allowed(
        gateway_factory: Callable[..., Gateway]) -> None:
    gw = gateway_factory("[lwm2m]\nenabled = true\n")
    with Device(gw.coap_port) as device:
        reply = device.register()
        assert reply.code == aiocoap.FORBIDDEN
        assert b"allow_nosec" in reply.payload
        assert device.update().code == aiocoap.NOT_FOUND  # never registered


def test_observation_notifications_become_uplinks_and_are_acked(
        lwm2m_gateway: Gateway, subscribe: Callable[[str], Subscription]) -> None:
    sub = subscribe(f"{UP}/up")
    with Device(lwm2m_gateway.coap_port) as device:
        assert device.register(query="lt=300&lwm2m=1.0&b=U").code == aiocoap.CREATED
        first = device.next_request()
        assert path_of(first) == "/3303/0/5700" and first.opt.observe == 0
        device.answer(first, aiocoap.CONTENT, b"21.5", 0, observe=1)
        second = device.next_request()
        assert path_of(second) == "/3304/0/5700"
        device.answer(second, aiocoap.CONTENT, b"40", 0, observe=1)
        # The first answer is a reading too; then a CON notification, ACKed once durable.
        notification = message(aiocoap.CONTENT, b"23.25", Type.CON, 4242, first.token)
        notification.opt.observe = 2
        notification.opt.content_format = 0
        device.send(notification)
        ack = device.receive()
        assert ack.mtype == Type.ACK and ack.mid == 4242
        device.send(notification)  # its retransmission gets the same ACK, no second uplink
        assert device.receive().mid == 4242
    # a notification carries the one resource observed: the required temperature is not
    # required of the humidity's
    readings = [m["readings"] for m in sub.wait_count(3)]
    assert sorted(r["temperature"]["value"] for r in readings if "temperature" in r) == [21.5, 23.25]
    assert [r["humidity"]["value"] for r in readings if "humidity" in r] == [40.0]


def test_commands_reach_the_device_when_awake_and_after_a_restart_and_a_new_port(
        lwm2m_gateway: Gateway, broker: Broker,
        subscribe: Callable[[str], Subscription]) -> None:
    acks = subscribe(f"{UP}/down/ack")
    with Device(lwm2m_gateway.coap_port) as device:
        assert device.register(query="lt=300&lwm2m=1.1&b=UQ").code == aiocoap.CREATED
        publish(broker, f"{UP}/down", {"id": "w1", "op": "write", "path": "/1/0/3",
                                       "value": 30})
        request = device.next_request()
        assert request.code == aiocoap.PUT and path_of(request) == "/1/0/3"
        assert request.payload == b"30" and request.opt.content_format == 0
        device.answer(request, aiocoap.CHANGED)
        wait_for(lambda: ("w1", "confirmed") in [(m["id"], m["state"])
                                                  for m in acks.messages("/down/ack")])
        confirmed = next(m for m in acks.messages("/down/ack") if m["state"] == "confirmed")
        assert confirmed["result"] == {"code": "2.04"}
        time.sleep(2.5)  # past awake_s: the device sleeps
        publish(broker, f"{UP}/down", {"id": "r1", "op": "read", "path": "/3303/0/5700"})
        wait_for(lambda: ("r1", "queued") in [(m["id"], m["state"])
                                               for m in acks.messages("/down/ack")])
        with pytest.raises(TimeoutError):
            device.next_request(timeout=1.0)
        lwm2m_gateway.kill()
        lwm2m_gateway.start()
    with Device(lwm2m_gateway.coap_port) as moved:  # its NAT gave it a new port
        assert moved.update().code == aiocoap.CHANGED
        request = moved.next_request()
        assert request.code == aiocoap.GET and path_of(request) == "/3303/0/5700"
        moved.answer(request, aiocoap.CONTENT, b"22.5", 0)
    wait_for(lambda: any(m["id"] == "r1" and m["state"] == "confirmed"
                         for m in acks.messages("/down/ack")))
    result = next(m for m in acks.messages("/down/ack")
                  if m["id"] == "r1" and m["state"] == "confirmed")["result"]
    assert result == {"code": "2.05", "content": [{"path": "/3303/0/5700", "value": "22.5"}]}


def test_bad_lwm2m_commands_are_rejected_on_arrival(
        lwm2m_gateway: Gateway, broker: Broker, subscribe: Callable[[str], Subscription]) -> None:
    acks = subscribe(f"{UP}/down/ack")
    publish(broker, f"{UP}/down", {"id": "b1", "op": "reboot", "path": "/3/0/4"})
    publish(broker, f"{UP}/down", {"id": "b2", "op": "write", "path": "/1/x"})
    publish(broker, f"{UP}/down", {"id": "b3", "op": "write-attr", "path": "/3303/0/5700",
                                   "attributes": {"pmin": "soon"}})
    states = acks.wait_count(3, "/down/ack")
    assert [(m["id"], m["state"]) for m in states] == [
        ("b1", "rejected"), ("b2", "rejected"), ("b3", "rejected")]
    assert "op must be one of" in states[0]["reason"]


def test_deregister_and_an_expired_lifetime_make_the_device_offline(
        gateway_factory: Callable[..., Gateway], subscribe: Callable[[str], Subscription]) -> None:
    gw = gateway_factory(LWM2M.replace("awake_s", "min_lifetime_s = 1\nawake_s")
                         + "[liveness]\ncheck_interval_s = 0.2\n")
    status = subscribe(f"{UP}/status")
    with Device(gw.coap_port) as device:
        assert device.register(query="lt=300&lwm2m=1.1&b=UQ").code == aiocoap.CREATED
        assert device.update(method=aiocoap.DELETE).code == aiocoap.DELETED
        assert device.update().code == aiocoap.NOT_FOUND
    with Device(gw.coap_port) as device:
        assert device.register(query="lt=1&lwm2m=1.1&b=UQ").code == aiocoap.CREATED
    states = status.wait_count(4, "/status")
    assert [s["state"] for s in states] == ["online", "offline", "online", "offline"]
    assert "De-register" in states[1]["reason"]
    assert "lifetime (1s) ran out" in states[3]["reason"]
    wait_for(lambda: gw.metric("nbiot_gateway_lwm2m_registrations") == 0)
    assert gw.metric("nbiot_gateway_lwm2m_registrations_expired_total") == 1


def _mutated(rng: random.Random, good: bytes) -> bytes:
    """`good` with a few bytes flipped, cut or repeated: near-valid input reaches deeper."""
    data = bytearray(good)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(data)) if data else 0
        choice = rng.random()
        if choice < 0.4 and data:
            data[where] = rng.randrange(256)
        elif choice < 0.7:
            del data[where:where + rng.randint(1, 8)]
        else:
            data[where:where] = data[where:where + rng.randint(1, 16)]
    return bytes(data)


def test_garbage_on_the_lwm2m_paths_never_stalls_the_gateway(lwm2m_gateway: Gateway) -> None:
    """Random and near-valid registrations, Sends from the registered address (they reach
    the decoders and the pipeline) and notifications on a live observation token: every
    one answered or dropped, no internal error logged, a good Register still served."""
    rng = random.Random(12)
    good_sends = [
        (110, json.dumps([{"bn": "/3303/0/", "n": "5700", "v": 21.5, "t": 1_796_000_000},
                          {"n": "/3/0/9", "v": 87}]).encode()),
        (112, cbor2.dumps([{-2: "/3303/0/", 0: "5700", 2: 21.5, -3: 1_796_000_001}])),
        (11544, cbor2.dumps({3303: {0: {5700: 21.5}}, 3304: {0: {5700: 40.0}}})),
    ]
    good_notifications = [(0, b"21.5"), (11542, bytes.fromhex("c800144166")), (60, cbor2.dumps(21.5)),
                          (42, b"\x01\x02")]
    with Device(lwm2m_gateway.coap_port) as device:
        assert device.register(query="lt=300&lwm2m=1.0&b=U").code == aiocoap.CREATED
        observe = device.next_request()
        device.answer(observe, aiocoap.CONTENT, b"21.5", 0, observe=1)
        for i in range(600):
            if i % 40 == 39:  # back in, if a garbage De-register took it out
                device.register(query="lt=300&lwm2m=1.1&b=U")
            kind = rng.random()
            token = rng.randbytes(rng.randint(0, 8))
            options: list[tuple[int, bytes]] = []
            if kind < 0.3:  # a Send from the registered address
                cf, good = rng.choice(good_sends)
                cf = cf if rng.random() < 0.8 else rng.choice([0, 40, 42, 60, 11542, 65000])
                options = [(C.URI_PATH, b"dp"), (C.CONTENT_FORMAT, wire.uint_value(cf))]
                payload = _mutated(rng, good) if rng.random() < 0.8 else rng.randbytes(200)
                msg = wire.Message(C.CON, C.POST, i, token, options, payload)
            elif kind < 0.55:  # a notification on the live observation
                cf, good = rng.choice(good_notifications)
                options = [(C.OBSERVE, wire.uint_value(i + 2)),
                           (C.CONTENT_FORMAT, wire.uint_value(cf))]
                msg = wire.Message(rng.choice([C.CON, C.NON]), rng.choice([C.CONTENT, C.CHANGED,
                                   C.NOT_FOUND]), i, observe.token, options,
                                   _mutated(rng, good) if rng.random() < 0.7 else b"")
            elif kind < 0.75:  # a Register or Update, near-valid
                path = rng.choice([["rd"], ["rd", TH.device_id], ["rd", "x" * rng.randint(0, 300)]])
                options = [(C.URI_PATH, p.encode()) for p in path]
                options += [(C.URI_QUERY, q) for q in rng.sample(
                    [f"ep={TH.device_id}".encode(), b"lt=" + str(rng.randint(-5, 10**7)).encode(),
                     rng.choice([b"b=U", b"b=UQ", b"b=", b"b=Z", b"Q"]),
                     rng.choice([b"lwm2m=1.0", b"lwm2m=1.1", b"lwm2m=9"]), rng.randbytes(12)],
                    rng.randint(0, 5))]
                payload = _mutated(rng, OBJECTS) if rng.random() < 0.7 else rng.randbytes(300)
                method = rng.choices([C.POST, C.DELETE, C.PUT], [17, 2, 1])[0]  # a few leave
                msg = wire.Message(C.CON, method, i, token, options, payload)
            else:  # anything at all on the LwM2M paths
                options = [(C.URI_PATH, p.encode()) for p in rng.choice([["rd"], ["dp"]])]
                options += [(C.URI_QUERY, rng.randbytes(rng.randint(0, 40)))
                            for _ in range(rng.randint(0, 4))]
                msg = wire.Message(rng.choice([C.CON, C.NON, C.ACK, C.RST]),
                                   rng.choice([C.GET, C.POST, C.CONTENT, C.EMPTY]), i, token,
                                   options, rng.randbytes(rng.randint(0, 600)))
            if msg.code == C.EMPTY:
                msg = wire.Message(msg.mtype, C.EMPTY, i)
            device.send(wire.encode(msg))
        device.sock.settimeout(0.5)
        while True:  # let the gateway catch up; answer nothing
            try:
                device.sock.recvfrom(65535)
            except TimeoutError:
                break
        assert device.register().code == aiocoap.CREATED
    assert lwm2m_gateway.proc is not None and lwm2m_gateway.proc.poll() is None
    log = lwm2m_gateway.log_path.read_text()
    assert "Traceback" not in log and "level=ERROR" not in log, log[-3000:]
    assert lwm2m_gateway.metric("nbiot_gateway_uplinks_rejected_total",
                                {"reason": "internal_error"}) == 0


async def test_a_request_the_device_never_answers_ends_unanswered() -> None:
    """RFC 7252 retransmission: MAX_RETRANSMIT resends at doubling timeouts, then None."""
    sent: list[float] = []
    loop = asyncio.get_running_loop()
    mids = iter(range(100))
    requester = Requester(lambda data, addr: sent.append(loop.time()), lambda: next(mids),
                          ack_timeout_s=0.02)
    done: asyncio.Future[wire.Message | None] = loop.create_future()
    requester.request(("127.0.0.1", 9), C.GET, [(C.URI_PATH, b"3")], b"", done.set_result)
    assert await asyncio.wait_for(done, 5) is None
    assert len(sent) == 5 and requester.in_flight == 0
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps)), gaps


async def test_an_empty_ack_then_a_separate_response_completes_the_request() -> None:
    loop = asyncio.get_running_loop()
    sent: list[bytes] = []
    requester = Requester(lambda data, addr: sent.append(data), lambda: 7, ack_timeout_s=0.05)
    done: asyncio.Future[wire.Message | None] = loop.create_future()
    token = requester.request(("127.0.0.1", 9), C.GET, [], b"", done.set_result)
    assert requester.received(wire.Message(C.ACK, C.EMPTY, 7), ("127.0.0.1", 9))
    await asyncio.sleep(0.3)  # no retransmission after the empty ACK
    assert len(sent) == 1
    response = wire.Message(C.CON, C.CONTENT, 99, token, [], b"1")
    assert requester.received(response, ("127.0.0.1", 9))
    assert (await done) is response
    assert wire.decode(sent[-1]).mtype == C.ACK  # the separate CON response was ACKed
    assert not requester.received(wire.Message(C.CON, C.CONTENT, 100, b"zz"), ("127.0.0.1", 9))


def test_sends_acked_while_the_broker_is_down_survive_kill_9_and_arrive(
        lwm2m_gateway: Gateway, broker: Broker, subscribe: Callable[[str], Subscription]) -> None:
    with Device(lwm2m_gateway.coap_port) as device:
        assert device.register(query="lt=300&lwm2m=1.1&b=U").code == aiocoap.CREATED
        broker.stop()
        acked = []
        for i in range(20):
            at = 1_796_000_400 + i
            reply = device.send_readings([{"n": "/3303/0/5700", "v": 20.0 + i / 10, "t": at}],
                                         112 if i % 2 else 110)
            assert reply.code == aiocoap.CHANGED, reply.payload  # durable on disk, not on MQTT
            acked.append(at * 1000)
        lwm2m_gateway.kill()
        broker.start()
        sub = subscribe(f"{UP}/up")
        lwm2m_gateway.start()
        got = sorted(m["seq"] for m in sub.wait_count(20))
    assert got == acked
