"""LwM2M interop with clients we did not write, against the real gateway and mosquitto:
npm's lwm2m-node-lib (a 1.0 client: Register, Update, Read, Write, Execute, Observe over
plain UDP, serving the gateway's requests on the port it registered from; installed by
scripts/bootstrap.sh into .node/) and libcoap's coap-client-notls (raw Register and Send,
`-p` fixing the source port so the Send comes from the registered address)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.ingest.coap import numbers as C
from gateway.ingest.coap import wire
from tests.conftest import DEADLINE_S, Broker, Gateway, Subscription, free_port, wait_for
from tests.test_downlink import publish_command

ROOT = Path(__file__).resolve().parent.parent
NODE_MODULES = ROOT / ".node" / "node_modules"
CLIENT_JS = Path(__file__).resolve().parent / "node" / "lwm2m_client.js"
LWM2M_TOML = "[lwm2m]\nenabled = true\nallow_nosec = true\n"
TH = "th-1"
DOWN = f"nbiot/plant/env_th/{TH}/down"


class NodeDevice:
    """lwm2m_client.js as a subprocess: its JSON events read by a thread into a queue."""

    def __init__(self, gateway: Gateway, log_dir: Path, location: str | None = None) -> None:
        node = shutil.which("node")
        if node is None or not (NODE_MODULES / "lwm2m-node-lib").is_dir():
            pytest.fail("node or lwm2m-node-lib is missing: run ./scripts/test (it installs "
                        "npm's lwm2m-node-lib@1 into .node/)")
        args = [node, str(CLIENT_JS), "127.0.0.1", str(gateway.coap_port), TH]
        self._stderr = open(log_dir / f"node-{os.urandom(3).hex()}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*args, *([location] if location else [])], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr,
            env={**os.environ, "NODE_PATH": str(NODE_MODULES)})
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.logs: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and "event" in event:
                self._events.put(event)
            else:  # the library's own log lines (logops writes JSON to stdout)
                self.logs.append(line.decode(errors="replace").strip())

    def wait_event(self, kind: str, timeout: float = DEADLINE_S) -> dict[str, Any]:
        """The next event of this kind (events of other kinds before it are skipped)."""
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"the npm LwM2M client never said {kind!r}; its log: {self.logs}")
            if event["event"] == "error":
                pytest.fail(f"the npm LwM2M client failed: {event}; its log: {self.logs}")
            if event["event"] == kind:
                return event

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)  # the pipe's EOF ends it
        for pipe in (self.proc.stdin, self.proc.stdout, self._stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()


@pytest.fixture
def node_devices(tmp_path: Path) -> Iterator[Callable[..., NodeDevice]]:
    started: list[NodeDevice] = []

    def start(gateway: Gateway, location: str | None = None) -> NodeDevice:
        device = NodeDevice(gateway, tmp_path, location)
        started.append(device)
        return device

    yield start
    for device in started:
        device.kill()


def confirmed(acks: Subscription, command_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((m for m in acks.messages("/down/ack")
                     if m["id"] == command_id and m["state"] == "confirmed"), None)

    result: dict[str, Any] = wait_for(find, what=f"command {command_id} confirmed")
    return result


def test_npm_client_registration_survives_kill_9_and_a_read_through_mqtt_reaches_it(
    gateway_factory: Callable[..., Gateway], broker: Broker,
    subscribe: Callable[[str], Subscription], node_devices: Callable[..., NodeDevice],
) -> None:
    gw = gateway_factory(LWM2M_TOML)
    device = node_devices(gw)
    assert device.wait_event("registered")["location"] == f"rd/{TH}"
    acks = subscribe(f"{DOWN}/ack")

    gw.kill()
    gw.start()
    publish_command(broker, {"id": "r1", "op": "read", "path": "/3303/0/5700"}, topic=DOWN)

    assert gw.metric("nbiot_gateway_lwm2m_registrations") == 1
    assert device.wait_event("read")["path"] == "/3303/0/5700"
    assert confirmed(acks, "r1")["result"] == {
        "code": "2.05", "content": [{"path": "/3303/0/5700", "value": "21.5"}]}


def test_write_and_execute_through_mqtt_reach_the_npm_client_and_come_back_on_down_ack(
    gateway_factory: Callable[..., Gateway], broker: Broker,
    subscribe: Callable[[str], Subscription], node_devices: Callable[..., NodeDevice],
) -> None:
    gw = gateway_factory(LWM2M_TOML)
    device = node_devices(gw)
    device.wait_event("registered")
    acks = subscribe(f"{DOWN}/ack")

    publish_command(broker, {"id": "w1", "op": "write", "path": "/1/0/3", "value": 30}, topic=DOWN)
    publish_command(broker, {"id": "x1", "op": "execute", "path": "/3/0/4", "args": "5"},
                    topic=DOWN)

    assert device.wait_event("write") == {"event": "write", "path": "/1/0/3", "value": "30"}
    assert device.wait_event("execute") == {"event": "execute", "path": "/3/0/4", "args": "5"}
    assert confirmed(acks, "w1")["result"] == {"code": "2.04"}
    assert confirmed(acks, "x1")["result"] == {"code": "2.04"}
    assert [m["state"] for m in acks.messages("/down/ack") if m["id"] == "w1"] == [
        "queued", "delivered", "confirmed"]


def test_npm_client_observe_notification_arrives_as_an_uplink(
    gateway_factory: Callable[..., Gateway], subscribe: Callable[[str], Subscription],
    node_devices: Callable[..., NodeDevice],
) -> None:
    uplinks = subscribe("nbiot/plant/env_th/+/up")
    gw = gateway_factory(LWM2M_TOML)
    device = node_devices(gw)
    device.wait_event("registered")
    # The gateway observes the type's resources after the Register; the first response
    # is a reading too.
    wait_for(lambda: any(m["readings"].get("temperature", {}).get("value") == 21.5
                         for m in uplinks.messages()), what="the observe response as an uplink")

    device.send("set /3303/0 5700 23.5")

    def notified() -> dict[str, Any] | None:
        return next((m for m in uplinks.messages()
                     if m["readings"].get("temperature", {}).get("value") == 23.5), None)

    message = wait_for(notified, what="the notification as an uplink")
    assert (message["device_id"], message["transport"]) == (TH, "lwm2m")
    assert message["readings"]["temperature"] == {"value": 23.5, "unit": "Cel"}


def test_command_for_an_away_device_is_delivered_after_a_restart_and_its_new_port(
    gateway_factory: Callable[..., Gateway], broker: Broker,
    subscribe: Callable[[str], Subscription], node_devices: Callable[..., NodeDevice],
) -> None:
    gw = gateway_factory(LWM2M_TOML)
    first = node_devices(gw)
    registration = first.wait_event("registered")
    old_port = registration["port"]
    acks = subscribe(f"{DOWN}/ack")
    first.kill()  # away: nothing listens on the port it registered from

    publish_command(broker, {"id": "w-away", "ttl_s": 600, "op": "write", "path": "/1/0/3",
                             "value": 15}, topic=DOWN)
    wait_for(lambda: any(m["id"] == "w-away" for m in acks.messages("/down/ack")),
             what="the command queued")
    gw.kill()
    gw.start()
    back = node_devices(gw, location=registration["location"])  # Update from a new port

    assert back.wait_event("updated")["port"] != old_port
    assert back.wait_event("write") == {"event": "write", "path": "/1/0/3", "value": "15"}
    assert confirmed(acks, "w-away")["result"] == {"code": "2.04"}


# -- libcoap ------------------------------------------------------------------------------
def coap_client(*args: str) -> str:
    binary = shutil.which("coap-client-notls")
    if binary is None:
        pytest.fail("coap-client-notls is not installed: run ./scripts/test (Debian libcoap3-bin)")
    done = subprocess.run([binary, "-v", "7", "-B", "10", *args], capture_output=True, text=True,
                          timeout=30, check=False)
    return done.stdout + done.stderr


def test_libcoap_register_and_send_reach_mqtt_and_the_registration_survives_restarts(
    gateway_factory: Callable[..., Gateway], subscribe: Callable[[str], Subscription],
) -> None:
    uplinks = subscribe("nbiot/plant/env_th/+/up")
    gw = gateway_factory(LWM2M_TOML)
    port = str(free_port(socket.SOCK_DGRAM))
    base = f"coap://127.0.0.1:{gw.coap_port}"

    registered = coap_client("-m", "post", "-p", port, "-t", "40", "-e", "</3303/0>,</3304/0>",
                             f"{base}/rd?ep={TH}&lt=300&lwm2m=1.1&b=UQ")
    assert "c:2.01" in registered and f"Location-Path:rd, Location-Path:{TH}" in registered, (
        registered)
    sends = []
    for n, restart in enumerate((None, signal.SIGTERM, signal.SIGKILL)):
        if restart is not None:
            gw.stop(restart)
            gw.start()
        pack = [{"bn": "/3303/0/", "bt": 1_763_900_000 + n, "n": "5700", "v": 22.5 + n},
                {"bn": "/3304/0/", "n": "5700", "v": 40}]
        sends.append(coap_client("-m", "post", "-p", port, "-t", "110", "-e", json.dumps(pack),
                                 f"{base}/dp"))

    assert all("c:2.04" in out for out in sends), sends
    messages = uplinks.wait_count(3)
    assert [(m["device_id"], m["transport"], m["seq"]) for m in messages] == [
        (TH, "lwm2m", (1_763_900_000 + n) * 1000) for n in range(3)]
    assert [m["readings"] for m in messages] == [
        {"temperature": {"value": 22.5 + n, "unit": "Cel"},
         "humidity": {"value": 40, "unit": "%RH"}} for n in range(3)]


def test_npm_client_humidity_notification_arrives_as_an_uplink(
    gateway_factory: Callable[..., Gateway], subscribe: Callable[[str], Subscription],
    node_devices: Callable[..., NodeDevice],
) -> None:
    everything = subscribe("nbiot/#")
    gw = gateway_factory(LWM2M_TOML)
    device = node_devices(gw)
    device.wait_event("registered")

    device.send("set /3304/0 5700 55.5")

    def notified() -> dict[str, Any] | None:
        return next((m for m in everything.messages()
                     if m.get("readings", {}).get("humidity", {}).get("value") == 55.5), None)

    wait_for(notified, timeout=8, what="the humidity notification as an uplink")


def test_observe_answered_without_the_observe_option_is_not_kept_as_an_observation(
    gateway_factory: Callable[..., Gateway],
) -> None:
    gw = gateway_factory(LWM2M_TOML)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as device:
        device.settimeout(DEADLINE_S)
        device.connect(("127.0.0.1", gw.coap_port))
        options = [(C.URI_PATH, b"rd"), (C.CONTENT_FORMAT, wire.uint_value(40)),
                   *((C.URI_QUERY, q) for q in (f"ep={TH}".encode(), b"lt=300", b"b=U"))]
        device.send(wire.encode(wire.Message(C.CON, C.POST, 1, b"r", options, b"</3303/0>")))
        answered = 0
        while answered < 2:  # the two observations the env_th type asks for
            msg = wire.decode(device.recv(2048))
            if msg.mtype == C.CON and msg.code == C.GET:
                device.send(wire.encode(wire.Message(
                    C.ACK, C.CONTENT, msg.mid, msg.token,
                    [(C.CONTENT_FORMAT, wire.uint_value(0))], b"21.5")))  # no Observe option
                answered += 1
    gw.stop()

    with contextlib.closing(sqlite3.connect(gw.workdir / "lwm2m.sqlite")) as db:
        (body,) = db.execute("SELECT body FROM registrations").fetchone()
    assert json.loads(body)["observations"] == {}
