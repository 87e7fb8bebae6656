"""Gateway hosts in a cluster (cluster.enabled), on loopback with mosquitto: any host
accepts any device's datagram and its owner answers; a dead host's devices are served by
the others and come back to it; the peer channel refuses what is not from a peer."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import aiocoap
import pytest

from gateway.cluster.membership import rank
from gateway.cluster.uplink_queue import binding_matches
from gateway.runtime.workers import owner
from tests.coap_raw import RawCoap, uplink_request
from tests.conftest import DEVICES, Broker, Device, Gateway, Subscription, free_port, wait_for

HOSTS = ("h1", "h2", "h3")
SECRET = "test-cluster-secret-0123456789"
DEAD_AFTER_S = 1.0


def cluster_toml(me: str, peer_ports: dict[str, int], ack: str = "disk") -> str:
    hosts = "\n".join(f'{name} = "127.0.0.1:{port}"' for name, port in peer_ports.items())
    return (f'[cluster]\nenabled = true\nhost = "{me}"\nsecret = "{SECRET}"\nack = "{ack}"\n'
            f'heartbeat_interval_s = 0.2\npeer_dead_after_s = {DEAD_AFTER_S}\n'
            f'check_uplink_queue = false\nbroker_ack_timeout_s = 1.0\n'
            f'[cluster.hosts]\n{hosts}\n')


class Cluster:
    def __init__(self, broker: Broker, tmp_path: Path, names: tuple[str, ...], ack: str,
                 workers: int = 1) -> None:
        self.peer_ports = {name: free_port(socket.SOCK_DGRAM) for name in names}
        self.hosts: dict[str, Gateway] = {}
        for name in names:
            workdir = tmp_path / name
            workdir.mkdir()
            gw = Gateway(workdir, broker.port)
            gw.write_config(cluster_toml(name, self.peer_ports, ack))
            text = gw.config_path.read_text().replace(
                'id = "gw-test"', f'id = "gw-{name}"\nworkers = {workers}')
            gw.config_path.write_text(text)
            with (workdir / "devices.csv").open("a") as registry:
                registry.writelines(f"{d.device_id},{d.device_type},{d.token},60,true\n"
                                    for d in SPREAD)
            self.hosts[name] = gw

    def start(self) -> None:
        for gw in self.hosts.values():
            gw.start()
        wait_for(lambda: all(gw.metric("nbiot_gateway_cluster_hosts_alive") == len(self.hosts)
                             for gw in self.hosts.values()), what="every host hears the others")

    def stop(self) -> None:
        for gw in self.hosts.values():
            if gw.proc is not None:
                gw.kill()


@pytest.fixture
def cluster(broker: Broker, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(names: tuple[str, ...] = HOSTS, ack: str = "disk", workers: int = 1) -> Cluster:
        c = Cluster(broker, tmp_path, names, ack, workers)
        made.append(c)
        c.start()
        return c

    yield make
    for c in made:
        c.stop()


# One device on each (host, worker) of two hosts with two workers each.
SPREAD = [Device(f"th-{i}", "env_th", f"tok-th-{i}") for i in (3, 4, 5, 8)]


def send(gw: Gateway, device_id: str, seq: int) -> aiocoap.Message:
    device = next(d for d in (*DEVICES, *SPREAD) if d.device_id == device_id)
    with RawCoap(gw.coap_port) as client:
        return client.exchange(uplink_request(gw.uri(device), {"seq": seq, "temperature": 21.5}))


def home_of(device_id: str, alive: tuple[str, ...] = HOSTS) -> str:
    return rank(device_id, alive)[0]


def test_a_device_is_answered_through_any_host_and_judged_by_its_owner(
        cluster: Callable[..., Cluster], subscribe: Callable[[str], Subscription]) -> None:
    c = cluster()
    sub = subscribe("nbiot/plant/+/+/up")
    home = home_of("th-1")
    others = [name for name in HOSTS if name != home]
    for seq, name in enumerate(HOSTS, start=1):
        reply = send(c.hosts[name], "th-1", seq)
        assert reply.code == aiocoap.CHANGED, reply
    # The same seq again through another host: the owner's replay window catches it.
    assert send(c.hosts[others[0]], "th-1", 3).code == aiocoap.CHANGED
    sub.wait_count(3)
    owner = c.hosts[home]
    wait_for(lambda: owner.metric("nbiot_gateway_mqtt_published_total") >= 3, what="published")
    assert sorted(m["seq"] for m in sub.messages()) == [1, 2, 3]
    assert owner.metric("nbiot_gateway_uplinks_accepted_total") == 3
    assert owner.metric("nbiot_gateway_uplinks_duplicate_total") == 1
    assert owner.metric("nbiot_gateway_cluster_relayed_datagrams_total") == 3
    for name in others:
        assert c.hosts[name].metric("nbiot_gateway_uplinks_received_total") == 0
        assert c.hosts[name].metric("nbiot_gateway_cluster_forwarded_datagrams_total") >= 1


def test_hosts_with_workers_relay_to_the_owning_worker(
        cluster: Callable[..., Cluster], subscribe: Callable[[str], Subscription]) -> None:
    c = cluster(("h1", "h2"), workers=2)
    sub = subscribe("nbiot/plant/+/+/up")
    assert {(rank(d.device_id, ("h1", "h2"))[0], owner(d.device_id, 2)) for d in SPREAD} == {
        ("h1", 0), ("h1", 1), ("h2", 0), ("h2", 1)}
    for name in ("h1", "h2"):
        for seq, device in enumerate(SPREAD, start=1 if name == "h1" else 11):
            assert send(c.hosts[name], device.device_id, seq).code == aiocoap.CHANGED
    assert len({(m["device_id"], m["seq"]) for m in sub.wait_count(8)}) == 8
    relayed = sum(c.hosts[n].metric("nbiot_gateway_cluster_relayed_datagrams_total")
                  for n in ("h1", "h2"))
    assert relayed == 4  # each device's datagram sent to the host that does not own it


def test_a_dead_hosts_devices_are_served_by_the_others_and_move_back(
        cluster: Callable[..., Cluster], subscribe: Callable[[str], Subscription]) -> None:
    c = cluster()
    sub = subscribe("nbiot/plant/+/+/up")
    home = home_of("th-1")
    entry = next(name for name in HOSTS if name != home)
    assert send(c.hosts[entry], "th-1", 1).code == aiocoap.CHANGED
    c.hosts[home].kill()
    heir = home_of("th-1", tuple(n for n in HOSTS if n != home))
    wait_for(lambda: all(c.hosts[n].metric("nbiot_gateway_cluster_hosts_alive") == 2
                         for n in {entry, heir}), what=f"{entry} and {heir} notice {home} died")
    assert c.hosts[heir].metric("nbiot_gateway_cluster_devices_taken_over") >= 1
    assert send(c.hosts[entry], "th-1", 2).code == aiocoap.CHANGED
    assert c.hosts[heir].metric("nbiot_gateway_uplinks_accepted_total") == 1
    c.hosts[home].start()
    wait_for(lambda: all(c.hosts[n].metric("nbiot_gateway_cluster_hosts_alive") == 3
                         for n in HOSTS), what=f"every host hears {home} again")
    assert send(c.hosts[entry], "th-1", 3).code == aiocoap.CHANGED
    assert c.hosts[home].metric("nbiot_gateway_uplinks_accepted_total") == 1
    # None lost; seq 1 may come twice (kill -9 can undo the deletion of a published record),
    # so three messages can arrive before seq 3 does: wait for the seqs, not a count.
    wait_for(lambda: {m["seq"] for m in sub.messages("/up")} >= {1, 2, 3},
             what="seqs 1, 2 and 3 on MQTT")
    assert sorted({m["seq"] for m in sub.messages("/up")}) == [1, 2, 3]


def test_the_peer_channel_drops_forged_and_foreign_messages(
        cluster: Callable[..., Cluster]) -> None:
    c = cluster(("h1", "h2"))
    target = c.hosts["h1"]
    port = c.peer_ports["h1"]
    datagram = uplink_request(target.uri(DEVICES[0]), {"seq": 1, "temperature": 20.0}).encode()
    body = struct.pack("!HB", 40000, 9) + b"127.0.0.1" + datagram
    message = struct.pack("!BcB", 1, b"F", 2) + b"h2" + struct.pack("!B", 0) + body
    forged = message + b"\0" * 16
    wrong_key = message + hmac.new(b"not-the-secret-at-all", message,
                                   hashlib.sha256).digest()[:16]
    unknown = struct.pack("!BcB", 1, b"F", 2) + b"h9" + struct.pack("!B", 0) + body
    unknown += hmac.new(SECRET.encode(), unknown, hashlib.sha256).digest()[:16]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for data in (forged, wrong_key, unknown, b"\x01", b"garbage" * 30):
            s.sendto(data, ("127.0.0.1", port))
    rejected = "nbiot_gateway_cluster_peer_messages_rejected_total"
    wait_for(lambda: sum(target.metric(rejected, {"reason": r})
                         for r in ("bad_mac", "unknown_host", "malformed")) == 5,
             what="five messages rejected")
    assert target.metric(rejected, {"reason": "bad_mac"}) == 2
    assert target.metric(rejected, {"reason": "unknown_host"}) == 1
    assert target.metric("nbiot_gateway_uplinks_received_total") == 0
    assert target.proc is not None and target.proc.poll() is None


def test_broker_ack_mode_answers_2_04_only_after_the_puback(
        cluster: Callable[..., Cluster], broker: Broker,
        subscribe: Callable[[str], Subscription]) -> None:
    c = cluster(("h1", "h2"), ack="broker")
    sub = subscribe("nbiot/plant/+/+/up")
    home = c.hosts[home_of("th-1", ("h1", "h2"))]
    assert send(home, "th-1", 1).code == aiocoap.CHANGED
    assert home.metric("nbiot_gateway_mqtt_published_total") >= 1  # PUBACKed before the 2.04
    assert [m["seq"] for m in sub.wait_count(1)] == [1]

    # The broker stops answering: the PUBACK does not come, the device gets 5.03 with
    # Max-Age; its retry of the same seq gets 2.04 once the broker took it.
    assert broker.proc is not None
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        reply = send(home, "th-1", 2)
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    assert reply.code == aiocoap.SERVICE_UNAVAILABLE, reply
    assert reply.opt.max_age is not None and b"broker" in reply.payload
    assert home.metric("nbiot_gateway_broker_ack_timeouts_total") == 1
    assert send(home, "th-1", 2).code == aiocoap.CHANGED
    assert sorted(m["seq"] for m in sub.wait_count(2)) == [1, 2]

    # No broker at all: 5.03 before anything is spooled.
    broker.stop()
    wait_for(lambda: home.metric("nbiot_gateway_mqtt_connected") == 0, what="disconnected")
    reply = send(home, "th-1", 3)
    assert reply.code == aiocoap.SERVICE_UNAVAILABLE and reply.opt.max_age is not None
    assert home.metric("nbiot_gateway_uplinks_rejected_total",
                       {"reason": "broker_unavailable"}) == 1


@pytest.mark.parametrize(("binding_key", "matches"), [
    ("nbiot.plant.*.*.up", True), ("#", True), ("nbiot.#", True), ("nbiot.plant.#.up", True),
    ("nbiot.plant.*.up", False), ("nbiot.other.*.*.up", False), ("nbiot.plant.*.*.status", False),
])
def test_uplink_binding_keys_are_matched_as_rabbitmq_does(binding_key: str,
                                                          matches: bool) -> None:
    assert binding_matches(binding_key, "nbiot.plant.type.device.up") is matches


def test_cluster_mode_refuses_to_start_without_asking_the_broker_about_its_queue(
        broker: Broker, tmp_path: Path) -> None:
    gw = Gateway(tmp_path, broker.port)
    unused = free_port()
    toml = cluster_toml("h1", {"h1": free_port(socket.SOCK_DGRAM), "h2": 9})
    toml = toml.replace("check_uplink_queue = false",
                        f'broker_api = ["http://127.0.0.1:{unused}"]')
    gw.write_config(toml)
    done = subprocess.run([sys.executable, "-m", "gateway", "run", "--config",
                           str(gw.config_path)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert done.returncode == 1
    assert "cannot start in cluster mode" in done.stderr
    assert f"http://127.0.0.1:{unused}" in done.stderr


def test_a_command_survives_its_home_hosts_death_and_is_confirmed_once(
        cluster: Callable[..., Cluster], broker: Broker,
        subscribe: Callable[[str], Subscription]) -> None:
    c = cluster()
    acks = subscribe("nbiot/plant/+/+/down/ack")
    home = home_of("th-1")
    entry = next(name for name in HOSTS if name != home)
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                    "-t", "nbiot/plant/env_th/th-1/down", "-m", '{"id": "c1", "rate_s": 30}'],
                   check=True, timeout=10)
    acks.wait_count(1, "/down/ack")
    c.hosts[home].kill()
    wait_for(lambda: all(c.hosts[n].metric("nbiot_gateway_cluster_hosts_alive") == 2
                         for n in HOSTS if n != home), what=f"{home} noticed dead")
    reply = send(c.hosts[entry], "th-1", 1)
    assert reply.code == aiocoap.CHANGED and json.loads(reply.payload)["id"] == "c1"
    device = next(d for d in DEVICES if d.device_id == "th-1")
    with RawCoap(c.hosts[entry].coap_port) as client:
        confirming = client.exchange(uplink_request(
            c.hosts[entry].uri(device), {"seq": 2, "temperature": 20.0, "ack": "c1"}))
    assert confirming.code == aiocoap.CHANGED and not confirming.payload
    c.hosts[home].start()  # its copy of c1 is dropped on the `confirmed` it missed
    wait_for(lambda: "c1 of th-1 confirmed through another host"
             in c.hosts[home].log_path.read_text(), what=f"{home} drops its copy")
    wait_for(lambda: c.hosts[entry].metric("nbiot_gateway_cluster_hosts_alive") == 3,
             what=f"{home} back")
    assert not send(c.hosts[entry], "th-1", 3).payload  # from home: nothing rides again
    states = [m["state"] for m in acks.wait_count(3, "/down/ack")]
    # (`queued` may come twice: kill -9 can undo the deletion of a published record.)
    assert states.count("confirmed") == 1 and states.count("delivered") == 1, states


def kill_host(gw: Gateway) -> None:
    """kill -9 of a whole host: its workers and the supervisor at once."""
    assert gw.proc is not None
    workers = Path(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children").read_text().split()
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)
    gw.kill()


def wait_all_workers_notice_dead(gw: Gateway, dead: str, workers: int = 2) -> None:
    """Every worker of `gw` takes `dead`'s devices (the merged hosts_alive is the least of
    the workers' views: it drops when the first one notices)."""
    wait_for(lambda: gw.log_path.read_text().count(f"cluster: host {dead} not heard for")
             >= workers, what=f"every worker of a survivor notices {dead} died")


def publish_command(broker: Broker, device: Device, command_id: str) -> None:
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                    "-t", f"nbiot/plant/{device.device_type}/{device.device_id}/down",
                    "-m", json.dumps({"id": command_id, "rate_s": 30})],
                   check=True, timeout=10)


def exchange(gw: Gateway, device: Device, report: dict[str, object]) -> aiocoap.Message:
    with RawCoap(gw.coap_port) as client:
        return client.exchange(uplink_request(gw.uri(device), report))


def stored_commands(gw: Gateway, device: Device) -> int:
    """Rows the worker owning `device` holds for it (2 workers: downlink.w{i}.sqlite)."""
    import sqlite3

    path = gw.workdir / f"downlink.w{owner(device.device_id, 2)}.sqlite"
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
        return int(db.execute("SELECT count(*) FROM commands WHERE device_id = ?",
                              (device.device_id,)).fetchone()[0])


@pytest.mark.parametrize("dies", ["home", "second"])
def test_hosts_with_workers_deliver_a_command_once_and_keep_it_through_a_host_death(
        cluster: Callable[..., Cluster], broker: Broker,
        subscribe: Callable[[str], Subscription], dies: str) -> None:
    c = cluster(("h1", "h2"), workers=2)
    acks = subscribe("nbiot/plant/+/+/down/ack")
    device = next(d for d in SPREAD if owner(d.device_id, 2) == 1)  # worker 0 hands it on
    names = rank(device.device_id, ("h1", "h2"))
    home, second = (c.hosts[n] for n in names)

    # Delivered through the home host: the second keeper's worker 1 drops its copy.
    publish_command(broker, device, "c1")
    # Both keepers, before the uplink: the home host answers it, and on a busy machine the
    # second one's copy can land first (the reply then carried no command).
    wait_for(lambda: stored_commands(home, device) == 1 and stored_commands(second, device) == 1,
             what="both keepers store c1")
    reply = exchange(second, device, {"seq": 1, "temperature": 20.0})  # relayed to home
    assert reply.code == aiocoap.CHANGED and json.loads(reply.payload)["id"] == "c1"
    assert exchange(second, device, {"seq": 2, "temperature": 20.0, "ack": "c1"}).code \
        == aiocoap.CHANGED
    wait_for(lambda: f"c1 of {device.device_id} confirmed through another host"
             in second.log_path.read_text(), what="the second keeper drops c1")

    # The next command outlives either host's kill -9.
    publish_command(broker, device, "c2")
    wait_for(lambda: stored_commands(second, device) == 1, what="the second keeper stores c2")
    wait_for(lambda: stored_commands(home, device) == 1, what="the home host stores c2")
    # (`queued` rides the spool after the command is stored: a kill -9 between loses it.)
    wait_for(lambda: ("c2", "queued") in {(m["id"], m["state"])
                                          for m in acks.messages("/down/ack")},
             what="c2 queued")
    dead, survivor = (home, second) if dies == "home" else (second, home)
    kill_host(dead)
    wait_all_workers_notice_dead(survivor, names[0] if dies == "home" else names[1])
    reply = exchange(survivor, device, {"seq": 3, "temperature": 20.0})
    assert reply.code == aiocoap.CHANGED and json.loads(reply.payload)["id"] == "c2"
    assert exchange(survivor, device, {"seq": 4, "temperature": 20.0, "ack": "c2"}).code \
        == aiocoap.CHANGED
    dead.start()  # its worker 0 hears the `confirmed` it missed and tells worker 1
    wait_for(lambda: f"c2 of {device.device_id} confirmed through another host"
             in dead.log_path.read_text(), what="the restarted host drops c2")
    wait_for(lambda: survivor.metric("nbiot_gateway_cluster_hosts_alive") == 2,
             what="both hosts alive")
    for entry in (home, second):  # nothing rides again, whoever the device talks to
        assert not exchange(entry, device, {"seq": 5 if entry is home else 6,
                                            "temperature": 20.0}).payload
    # A record republished after kill -9 (the deletion of a published record undone) comes
    # again byte for byte: each state change is counted once by its time.
    def changes() -> list[tuple[str, str]]:
        return [(i, state) for i, state, _ in
                {(m["id"], m["state"], m["at"]) for m in acks.messages("/down/ack")}]

    try:
        wait_for(lambda: len(changes()) >= 6, what="queued, delivered, confirmed of c1, c2")
    except pytest.fail.Exception:
        pytest.fail(f"state changes on .../down/ack: {acks.lines()}")
    states = changes()
    for command_id in ("c1", "c2"):
        for state in ("queued", "delivered", "confirmed"):
            assert states.count((command_id, state)) == 1, states


def test_an_uplink_two_hosts_accepted_across_a_takeover_is_counted_with_its_seq(
        cluster: Callable[..., Cluster], subscribe: Callable[[str], Subscription]) -> None:
    c = cluster(("h1", "h2"), workers=2)
    sub = subscribe("nbiot/plant/#")
    device = next(d for d in SPREAD if owner(d.device_id, 2) == 1)  # worker 1 on both hosts
    names = rank(device.device_id, ("h1", "h2"))
    home, heir = (c.hosts[n] for n in names)
    assert exchange(home, device, {"seq": 17, "temperature": 20.0}).code == aiocoap.CHANGED
    kill_host(home)  # as if right after its commit: the device never saw the 2.04
    wait_all_workers_notice_dead(heir, names[0])
    for seq in (17, 18):  # the retransmission is new to the heir, which has no window
        assert exchange(heir, device, {"seq": seq, "temperature": 20.0}).code \
            == aiocoap.CHANGED
    assert heir.metric("nbiot_gateway_uplinks_accepted_total") == 2

    home.start()  # the heir gives the device back, with the seqs it accepted for it
    wait_for(lambda: home.metric("nbiot_gateway_cluster_duplicates_total") == 1,
             what="the home host counts the duplicate")
    report = sub.wait_count(1, "/duplicates")
    assert report[0]["device_id"] == device.device_id and report[0]["seqs"] == [17]
    assert f"device {device.device_id} seq 17 accepted by both" in home.log_path.read_text()
    # 18 is refused as new on the home host too: the merged window holds it.
    assert exchange(home, device, {"seq": 18, "temperature": 20.0}).code == aiocoap.CHANGED
    assert exchange(home, device, {"seq": 19, "temperature": 20.0}).code == aiocoap.CHANGED
    wait_for(lambda: 19 in {m["seq"] for m in sub.messages()}, what="seq 19 published")
    # Distinct messages: one republished after kill -9 (its deletion undone) is the same bytes.
    seqs = [json.loads(p)["seq"] for t, p in set(sub.lines())
            if t.endswith(f"/{device.device_id}/up")]
    assert seqs.count(18) == 1 and seqs.count(17) == 2, seqs  # home's and the heir's
    assert heir.metric("nbiot_gateway_cluster_duplicates_total") == 0
