"""The cluster lab (gateway/lab) and the balancer (gateway/tools/balancer.py) on real
namespaces, real nf_tables and libcoap's client and server: namespaces built and all
removed, a CoAP exchange through the VIP, a dead backend's devices moved. Root only."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.mqtt.client import MqttClient
from gateway.tools.balancer import SLOTS, Backend, assign_slots, render_ruleset, render_slot_maps
from gateway.tools.lab.balancer import LabBalancer, lab_balancer
from gateway.tools.lab.netns import Lab, LabError, leftovers
from gateway.tools.lab.rabbit import RabbitCluster
from tests.conftest import ROOT, wait_for

SHIPPED_NFT = ROOT / "config" / "nftables" / "nbiot-gateway-balancer.nft"
# Each test its own prefix, named after this checkout and the xdist worker too: a lab left
# by a crashed run is removed by the next run here, and runs in other worktrees or workers
# never meet it. Subnets: the first free one (a demo may be up beside us).
_CHECKOUT = hashlib.sha1(str(ROOT).encode()).hexdigest()[:4]
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")[-1:]


def P(test: str) -> str:
    return f"t{_CHECKOUT}{test}{_WORKER}"


if os.geteuid() != 0:
    pytest.fail("tests/test_lab.py needs root (network namespaces), as ./scripts/test runs",
                pytrace=False)

# Namespaces, nf_tables and RabbitMQ nodes on fixed subnets: one test at a time.
pytestmark = pytest.mark.xdist_group("netns")


def lab(prefix: str, **kw: object) -> Lab:
    return Lab(prefix, net=None, **kw)  # type: ignore[arg-type]


# -- the namespaces -----------------------------------------------------------------------
def test_lab_builds_its_namespaces_and_removes_every_one(tmp_path: Path) -> None:
    with lab(P("a"), hosts=2, brokers=1, workdir=tmp_path) as built:
        during = leftovers(P("a"))
        sleeper = built.popen("h2", ["sleep", "300"])
        host_route = built.run("h1", ["ip", "route", "show", "default"]).stdout
        device_route = built.run("dev", ["ip", "route", "show", "default"]).stdout
    assert {f"{P('a')}-{short}" for short in ("lb", "dev", "h1", "h2", "b1", "br")} <= set(during)
    assert host_route.startswith(f"default via {built.balancer_ip} ")
    assert device_route.startswith(f"default via {built.vip} ")
    assert sleeper.poll() == -signal.SIGTERM
    assert leftovers(P("a")) == []


def test_lab_removes_a_crashed_runs_leftovers_at_start(tmp_path: Path) -> None:
    subprocess.run(["ip", "netns", "add", P("b") + "-h1"], check=True)
    subprocess.run(["ip", "link", "add", P("b") + "-br", "type", "bridge"], check=True)
    daemon = subprocess.Popen(["ip", "netns", "exec", P("b") + "-h1", "sleep", "300"])
    with lab(P("b"), hosts=1, brokers=0, workdir=tmp_path):
        pass
    assert daemon.wait(10) == -signal.SIGKILL
    assert leftovers(P("b")) == []


def test_lab_refuses_a_prefix_in_use(tmp_path: Path) -> None:
    with lab(P("c"), hosts=1, brokers=0, workdir=tmp_path), pytest.raises(LabError, match="in use"):
        Lab(P("c"), hosts=1, brokers=0, net=None).__enter__()
    assert leftovers(P("c")) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_lab_tears_down_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    prefix = P("d" if sig == signal.SIGTERM else "j")
    # Ctrl-C as in a terminal: an xdist worker's children inherit SIGINT ignored.
    script = textwrap.dedent(f"""
        import signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from gateway.tools.lab.netns import Lab
        with Lab("{prefix}", hosts=1, brokers=1, net=None) as lab:
            lab.popen("b1", ["sleep", "300"])
            print("up", flush=True)
            time.sleep(60)
    """)
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=ROOT) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "up\n"
            proc.send_signal(sig)
            _, stderr = proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode != 0
    assert ("LabInterrupted" if sig == signal.SIGTERM else "KeyboardInterrupt") in stderr
    assert leftovers(prefix) == []


# -- the balancer's rules -----------------------------------------------------------------
def test_a_dead_backend_moves_only_its_own_slots_and_takes_them_back() -> None:
    backends = [Backend(f"h{i}", f"10.0.0.{10 + i}") for i in range(1, 5)]
    everyone = {b.name for b in backends}
    homes = assign_slots(backends, everyone)
    for down in itertools.chain.from_iterable(
            itertools.combinations(sorted(everyone), k) for k in range(1, 4)):
        after = assign_slots(backends, everyone - set(down))
        moved = {i for i, (a, b) in enumerate(zip(homes, after, strict=True)) if a != b}
        assert moved == {i for i, b in enumerate(homes) if b.name in down}, down
        held = [sum(1 for b in after if b.name == n) for n in sorted(everyone - set(down))]
        assert max(held) - min(held) <= 1, (down, held)
    assert assign_slots(backends, set()) == homes


def test_the_shipped_nft_file_is_what_the_checker_installs(tmp_path: Path) -> None:
    backends = [Backend("h1", "10.0.0.11"), Backend("h2", "10.0.0.12"), Backend("h3", "10.0.0.13")]
    rendered = render_ruleset("192.0.2.10", 5683, backends) + render_slot_maps(
        assign_slots(backends, {"h1", "h2", "h3"}))
    shipped = SHIPPED_NFT.read_text()
    with lab(P("e"), hosts=1, brokers=0, workdir=tmp_path) as built:
        checked = built.run("lb", ["nft", "-c", "-f", str(SHIPPED_NFT)], check=False)
    assert shipped.endswith(rendered)
    assert checked.returncode == 0, checked.stderr


# -- through the balancer -----------------------------------------------------------------
DEVICE_PORTS = range(41000, 41012)
RAW_BAD_CHECKSUM = """
import socket, struct, sys
ping = bytes((0x40, 0, 0x12, 0x34))
udp = struct.pack("!HHHH", 40999, 5683, 8 + len(ping), 0xDEAD) + ping  # checksum wrong
socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP).sendto(udp, (sys.argv[1], 0))
"""
PING_FROM_DEVICE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.sendto(bytes((0x40, 0, 0x12, 0x34)), (sys.argv[1], 5683))
print(s.recvfrom(64)[1])
"""


BALANCED_TAGS = {  # a prefix of its own for each test on the `balanced` fixture
    "test_coap_through_the_vip_reaches_a_host_that_sees_the_device_and_answers_from_the_vip": "f",
    "test_a_killed_backends_devices_move_to_the_others_and_only_they_move": "h",
    "test_the_checker_puts_back_a_table_removed_under_it": "i",
}


class Fleet:
    """libcoap's server on every host, logging each new peer, and its client in dev."""

    def __init__(self, built: Lab) -> None:
        self.lab = built
        self.servers = {h: self.start(h) for h in built.hosts}

    def start(self, host: str) -> subprocess.Popen[bytes]:
        return self.lab.popen(host, ["coap-server-notls", "-A", self.lab.host_ip(int(host[1:])),
                                     "-v", "7"], log=self.log(host))

    def log(self, host: str) -> Path:
        return self.lab.workdir / f"coap-server-{host}.log"

    def get(self, device_port: int) -> subprocess.CompletedProcess[str]:
        return self.lab.run("dev", ["coap-client-notls", "-B", "3", "-p", str(device_port),
                                    f"coap://{self.lab.vip}/"], check=False)

    def served_by(self) -> dict[int, set[str]]:
        """Device port -> the hosts whose server saw a session from the device's own address."""
        seen: dict[int, set[str]] = {}
        pattern = re.compile(rf"<-> {re.escape(self.lab.device_ip)}:(\d+) .*new incoming session")
        for host in self.lab.hosts:
            for match in pattern.finditer(self.log(host).read_text(errors="replace")):
                seen.setdefault(int(match.group(1)), set()).add(host)
        return seen

    def csum_errors(self, ns: str) -> int:
        snmp = self.lab.run(ns, ["cat", "/proc/net/snmp"]).stdout.splitlines()
        names, values = (line.split() for line in snmp if line.startswith("Udp:"))
        return int(values[names.index("InCsumErrors")])


@pytest.fixture
def balanced(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Fleet, LabBalancer]]:
    tag = BALANCED_TAGS[request.function.__name__]
    with lab(P(tag), hosts=3, brokers=0, workdir=tmp_path, software_checksums=True) as built:
        fleet = Fleet(built)
        with lab_balancer(built) as running:
            running.wait_for(set(built.hosts))
            yield fleet, running


def test_coap_through_the_vip_reaches_a_host_that_sees_the_device_and_answers_from_the_vip(
        balanced: tuple[Fleet, LabBalancer]) -> None:
    fleet, _ = balanced
    built = fleet.lab
    answers = [fleet.get(port) for port in DEVICE_PORTS]
    replied_from = built.run("dev", [sys.executable, "-c", PING_FROM_DEVICE, built.vip]).stdout
    built.run("dev", [sys.executable, "-c", RAW_BAD_CHECKSUM, built.host_ip(1)])
    wait_for(lambda: fleet.csum_errors("h1") == 1, what="h1 to drop the bad checksum")
    served = fleet.served_by()
    assert all(a.returncode == 0 and "libcoap" in a.stdout for a in answers), answers
    assert all(len(served.get(port, ())) == 1 for port in DEVICE_PORTS), served
    assert len(set().union(*served.values()) - {"h1", "h2", "h3"}) == 0
    assert replied_from.strip() == repr((built.vip, 5683))
    # Checksums are checked in software here: the NAT's rewrites kept them right (the one
    # error is the deliberately bad datagram, proof that the check is on).
    assert [fleet.csum_errors(ns) for ns in ("dev", "h1", "h2", "h3")] == [0, 1, 0, 0]


def test_a_killed_backends_devices_move_to_the_others_and_only_they_move(
        balanced: tuple[Fleet, LabBalancer]) -> None:
    fleet, running = balanced
    for port in DEVICE_PORTS:
        fleet.get(port)
    before = {port: hosts.pop() for port, hosts in fleet.served_by().items()}
    victim = max(fleet.lab.hosts, key=lambda h: list(before.values()).count(h))
    fleet.lab.kill(fleet.servers[victim])
    moved_after_s = running.wait_for(set(fleet.lab.hosts) - {victim})
    print(f"\nbalancer: {victim} killed -9, its slots moved after {moved_after_s:.2f} s")
    answers = [fleet.get(port) for port in DEVICE_PORTS]
    after = fleet.served_by()
    state = running.state()
    assert all(a.returncode == 0 and "libcoap" in a.stdout for a in answers), answers
    assert state is not None and state.slots[victim] == 0 and sum(state.slots.values()) == SLOTS
    for port, host in before.items():
        if host == victim:  # its devices now on exactly one live host
            assert len(after[port] - {victim}) == 1, (port, after[port])
        else:  # everyone else stayed where they were
            assert after[port] == {host}, (port, after[port])


# -- the broker cluster -------------------------------------------------------------------
async def publish_acked(cluster: RabbitCluster, address: str, client_id: str,
                        uplinks: list[dict[str, object]]) -> None:
    host, port = address.split(":")
    client = await MqttClient.connect(host, int(port), client_id=client_id,
                                      username=cluster.user, password=cluster.password)
    for uplink in uplinks:
        await client.publish_and_wait(f"nbiot/plant/{uplink['device_id']}/t1/up",
                                      json.dumps(uplink).encode())
    await client.disconnect()


async def durable_session(cluster: RabbitCluster, address: str, client_id: str) -> None:
    host, port = address.split(":")
    client = await MqttClient.connect(host, int(port), client_id=client_id, clean_session=False,
                                      username=cluster.user, password=cluster.password)
    await client.subscribe("nbiot/plant/+/+/down", qos=1)
    await client.disconnect()


def test_the_rabbitmq_cluster_keeps_a_pubacked_uplink_in_its_quorum_queue_with_a_node_down(
        tmp_path: Path) -> None:
    with lab(P("g"), hosts=1, brokers=3, workdir=tmp_path) as built, \
            RabbitCluster(built, nodes=3) as cluster:
        print(f"\nrabbitmq: nodes serving after {cluster.start_seconds} s (booted at once, "
              "MQTT enabled node by node), "
              f"restarted to take MQTT CONNECTs: {cluster.mqtt_repairs or 'none'}")
        cluster.declare_uplink_queue("uplinks", "nbiot.plant.*.*.up")
        bound = cluster.bindings_for("nbiot/plant/d1/t1/up"), cluster.bindings_for("nbiot/x/up")
        b1, b2, b3 = cluster.mqtt_addresses()
        asyncio.run(publish_acked(cluster, b2, "pub-1", [{"device_id": "d1", "seq": 1}]))
        asyncio.run(durable_session(cluster, b3, "sub-1"))
        cluster.kill9("b2")
        asyncio.run(publish_acked(cluster, b1, "pub-2", [{"device_id": "d1", "seq": 2}]))
        delivered = cluster.read_queue("uplinks", 10)
        queues = {q["name"]: q for q in cluster.queues()}
        members = set(cluster.queue_info("uplinks")["members"])
    assert bound == (["uplinks"], [])
    assert [(key, json.loads(body)["seq"]) for key, body in delivered] == [
        ("nbiot.plant.d1.t1.up", 1), ("nbiot.plant.d1.t1.up", 2)]
    assert members == {n.node for n in cluster.nodes}
    assert queues["uplinks"]["type"] == "quorum"
    assert queues["mqtt-subscription-sub-1qos1"]["type"] == "quorum"  # durable MQTT sessions
    assert leftovers(P("g")) == []


def test_the_checker_puts_back_a_table_removed_under_it(
        balanced: tuple[Fleet, LabBalancer]) -> None:
    fleet, running = balanced

    def table_installed() -> bool:
        return fleet.lab.run("lb", ["nft", "list", "table", "ip", "nbiot_balancer"],
                             check=False).returncode == 0

    fleet.lab.run("lb", ["nft", "flush", "ruleset"])
    wait_for(table_installed, what="the checker to notice and install its table again")
    fleet.lab.run("lb", ["nft", "flush", "ruleset"])
    fleet.lab.kill(fleet.servers["h2"])  # the map rewrite finds no table: all of it again
    running.wait_for({"h1", "h3"})
    answers = [fleet.get(port) for port in DEVICE_PORTS[:4]]
    table = fleet.lab.run("lb", ["nft", "list", "map", "ip", "nbiot_balancer", "slot_addr"]).stdout
    assert all(a.returncode == 0 and "libcoap" in a.stdout for a in answers), answers
    assert fleet.lab.host_ip(2) not in table and fleet.lab.host_ip(1) in table
