"""A RabbitMQ 3.10 cluster in a lab: one node per broker namespace (its own epmd, long
names `rabbit@10.N.0.2x`), MQTT with durable sessions on quorum queues, the management API
for declaring the uplink queue and for reading it back as an independent consumer.

Every node it starts it stops, and the epmd daemons with them; it never touches a system
RabbitMQ (no /usr/sbin wrappers, no /var/lib/rabbitmq: a temp HOME, cookie and data dir).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import json
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from gateway.cluster.uplink_queue import binding_matches, mqtt_to_routing_key
from gateway.mqtt.client import MqttClient, MqttError
from gateway.tools.lab.netns import Lab, LabError
from gateway.tools.localstack import StackError, wait_until

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
MQTT_PORT, AMQP_PORT, MANAGEMENT_PORT, DIST_PORT = 1883, 5672, 15672, 25672
START_TIMEOUT_S = 90.0  # ~7 s a node alone; three at once on 2 shared cores, 20-30 s
# Once the cluster formed, a node takes MQTT CONNECTs at once, or never (_repair_mqtt); a
# refused CONNECT takes 5 s to say so.
MQTT_JOIN_S = 10.0
STOP_TIMEOUT_S = 15.0  # for a killed node to be gone
HTTP_TIMEOUT_S = 10.0
# The Erlang schedulers' busy-waiting burns idle cores; three nodes share two with everyone
# else (RabbitMQ's advice for shared hosts).
ERL_ARGS = "+sbwt none +sbwtdcpu none +sbwtdio none"


class RabbitError(LabError):
    """A node did not start or join, or the management API refused a request."""


@dataclass(frozen=True)
class RabbitNode:
    name: str  # the lab namespace, "b1"
    ip: str
    datadir: Path

    @property
    def node(self) -> str:
        return f"rabbit@{self.ip}"

    @property
    def mqtt_address(self) -> str:
        return f"{self.ip}:{MQTT_PORT}"


class RabbitCluster:
    """`with RabbitCluster(lab, nodes=3) as cluster:` one node in each of the lab's broker
    namespaces b1..bN, started at once, clustered by classic peer discovery, yielded when
    every node runs in one cluster. MQTT on port 1883 of each node with `user`/`password`,
    durable MQTT sessions on quorum queues, the management API on port 15672."""

    def __init__(self, lab: Lab, nodes: int = 3, *, user: str = "nbiot-gateway",
                 password: str | None = None) -> None:
        if not 1 <= nodes <= len(lab.brokers):
            raise RabbitError(f"{nodes} nodes, but the lab has {len(lab.brokers)} broker "
                              "namespaces")
        if not (RABBIT_BIN / "rabbitmq-server").exists():
            raise RabbitError("RabbitMQ is not installed (apt-get install rabbitmq-server; "
                              "./scripts/test does it without starting the system's)")
        self.lab = lab
        self.user = user
        self.password = password or secrets.token_hex(8)
        self.home = lab.workdir / "rabbit-home"  # the one Erlang cookie every node shares
        self.nodes = [RabbitNode(f"b{j}", lab.broker_ip(j), lab.workdir / f"rabbit-b{j}")
                      for j in range(1, nodes + 1)]
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.start_seconds: dict[str, float] = {}  # node -> seconds from start to serving
        self.mqtt_repairs: list[str] = []  # nodes restarted at start to take MQTT CONNECTs

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> RabbitCluster:
        try:
            self._write_files()
            started = time.monotonic()
            for node in self.nodes:
                self._start(node)
            with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
                list(pool.map(lambda n: self._wait_serving(n, started), self.nodes))
            self._wait_members(START_TIMEOUT_S)
            self._repair_mqtt()
        except BaseException:
            self._stop_all()
            raise
        return self

    def _repair_mqtt(self) -> None:
        """Nodes started at once often leave one outside the MQTT plugin's client-ID Raft
        group (3.10 drops a join that reaches the new leader before it may change members,
        and does not retry; 2 of 3 starts here), and that node refuses every CONNECT for
        good ("client ID registration timed out" in its log). Restarted, it joins the
        formed group. (Enabling the plugin node by node after clustering instead left the
        first node without client-ID tracking at all.)"""
        for node in self.nodes:
            try:
                self._wait_mqtt(node, MQTT_JOIN_S)
            except StackError:
                self.kill9(node.name)
                self.restart(node.name)
                self.mqtt_repairs.append(node.name)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop_all()

    def _write_files(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16).upper())
            cookie.chmod(0o400)
        peers = "\n".join(f"cluster_formation.classic_config.nodes.{i} = {n.node}"
                          for i, n in enumerate(self.nodes, 1))
        for node in self.nodes:
            shutil.rmtree(node.datadir, ignore_errors=True)  # a new cluster, every time
            node.datadir.mkdir(parents=True)
            (node.datadir / "enabled_plugins").write_text("[rabbitmq_mqtt,rabbitmq_management].\n")
            # A quorum queue reports its depth to the statistics each tick (5 s by default).
            (node.datadir / "advanced.config").write_text("[{rabbit, [{quorum_tick_interval, 1000}]}].\n")
            (node.datadir / "rabbitmq.conf").write_text(f"""\
listeners.tcp.1 = {node.ip}:{AMQP_PORT}
mqtt.listeners.tcp.1 = {node.ip}:{MQTT_PORT}
management.tcp.ip = {node.ip}
management.tcp.port = {MANAGEMENT_PORT}
# durable MQTT sessions (clean_session=false) on replicated queues; takes effect only on a
# cluster created with it
mqtt.durable_queue_type = quorum
mqtt.allow_anonymous = false
loopback_users = none
default_user = {self.user}
default_pass = {self.password}
# queue depths in the management API within a second, not five
collect_statistics_interval = 1000
cluster_formation.peer_discovery_backend = classic_config
{peers}
log.console = true
log.console.level = info
log.file = false
""")

    def _env(self, node: RabbitNode) -> dict[str, str]:
        d = node.datadir
        return {"HOME": str(self.home), "RABBITMQ_NODENAME": node.node,
                "RABBITMQ_USE_LONGNAME": "true", "RABBITMQ_NODE_PORT": str(AMQP_PORT),
                "RABBITMQ_DIST_PORT": str(DIST_PORT), "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
                "RABBITMQ_LOG_BASE": str(d / "log"), "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": ERL_ARGS}

    def _start(self, node: RabbitNode) -> None:
        self._procs[node.name] = self.lab.popen(
            node.name, [str(RABBIT_BIN / "rabbitmq-server")], env=self._env(node),
            log=node.datadir / "server.log")

    def _wait_serving(self, node: RabbitNode, since: float) -> None:
        proc = self._procs[node.name]

        def serving() -> bool:
            if proc.poll() is not None:
                tail = (node.datadir / "server.log").read_text(errors="replace")[-3000:]
                raise RabbitError(f"RabbitMQ node {node.node} exited with {proc.returncode}:"
                                  f"\n{tail}")
            try:
                socket.create_connection((node.ip, MQTT_PORT), 0.5).close()
                return bool(self._api(node, "GET", "/api/overview"))
            except (OSError, RabbitError):
                return False

        wait_until(serving, START_TIMEOUT_S, f"RabbitMQ node {node.node} (MQTT and the "
                   "management API)")
        self.start_seconds[node.name] = time.monotonic() - since

    def wait_clustered(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until every node of the cluster that is not killed runs, seen from each, and
        accepts an MQTT CONNECT (client-ID tracking is a Raft group of its own)."""
        self._wait_members(timeout_s)
        for node in self.nodes:
            if self.running(node.name):
                self._wait_mqtt(node, timeout_s)

    def _wait_members(self, timeout_s: float) -> None:
        expected = {n.node for n in self.nodes if self.running(n.name)}

        def clustered() -> bool:
            for node in self.nodes:
                if node.node not in expected:
                    continue
                try:
                    listed = self._api(node, "GET", "/api/nodes")
                except RabbitError:
                    return False
                if {n["name"] for n in listed if n.get("running")} != expected:
                    return False
            return True

        wait_until(clustered, timeout_s, f"RabbitMQ nodes {sorted(expected)} in one cluster")

    def _wait_mqtt(self, node: RabbitNode, timeout_s: float) -> None:
        wait_until(functools.partial(self._mqtt_connects, node), timeout_s,
                   f"RabbitMQ node {node.node} to accept an MQTT CONNECT")

    def _mqtt_connects(self, node: RabbitNode) -> bool:
        async def connect() -> None:
            client = await MqttClient.connect(node.ip, MQTT_PORT, client_id=f"lab-ready-{node.name}",
                                              username=self.user, password=self.password,
                                              timeout_s=5)
            await client.disconnect()

        try:
            asyncio.run(connect())
        except MqttError:
            return False
        return True

    def _stop_all(self) -> None:
        """SIGKILL every node and its namespace's epmd: the lab's data dies with it, and a
        graceful stop costs ~5 s a cluster for nothing kept."""
        for name in list(self._procs):
            self.kill9(name)
        for node in self.nodes:  # epmd daemonized out of the node's process group
            self.lab.kill_everything_in(node.name)

    # -- faults --------------------------------------------------------------------------
    def node(self, name: str) -> RabbitNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise RabbitError(f"no RabbitMQ node {name!r} ({', '.join(n.name for n in self.nodes)})")

    def running(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def kill9(self, name: str) -> None:
        """SIGKILL node `name` (its whole process group; its namespace's epmd lives on, as
        it would on a real host whose RabbitMQ crashed)."""
        proc = self._procs.pop(self.node(name).name)
        self.lab.kill(proc, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT_S)

    def restart(self, name: str) -> float:
        """Start a killed node again (it rejoins from its own data); seconds until the
        cluster runs it again."""
        node = self.node(name)
        if self.running(name):
            raise RabbitError(f"RabbitMQ node {node.node} is running")
        started = time.monotonic()
        self._start(node)
        self._wait_serving(node, started)
        self.wait_clustered()
        return time.monotonic() - started

    # -- MQTT and queues -----------------------------------------------------------------
    def mqtt_addresses(self) -> list[str]:
        """"ip:port" of every node's MQTT listener, killed ones included."""
        return [n.mqtt_address for n in self.nodes]

    def declare_uplink_queue(self, name: str, binding_key: str, queue_type: str = "quorum"
                             ) -> None:
        """A durable queue `name` bound to amq.topic with `binding_key` (AMQP form:
        `nbiot.plant.*.*.up`; see `mqtt_to_routing_key`). A quorum queue has a member on
        every node; "classic" (for comparison) lives on the node that declared it."""
        q = urllib.parse.quote(name, safe="")
        self._api_any("PUT", f"/api/queues/%2F/{q}",
                      {"durable": True, "auto_delete": False,
                       "arguments": {"x-queue-type": queue_type}})
        self._api_any("POST", f"/api/bindings/%2F/e/amq.topic/q/{q}",
                      {"routing_key": binding_key, "arguments": {}})

    def queue_info(self, name: str) -> dict[str, Any]:
        """The management API's view of queue `name` (type, members, leader, messages)."""
        info: dict[str, Any] = self._api_any(
            "GET", f"/api/queues/%2F/{urllib.parse.quote(name, safe='')}")
        return info

    def queues(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = self._api_any("GET", "/api/queues/%2F")
        return listed

    def bindings_for(self, topic: str) -> list[str]:
        """The queues an MQTT PUBLISH to `topic` would reach through amq.topic (none: its
        PUBACK means nothing, RabbitMQ drops it)."""
        key = mqtt_to_routing_key(topic)
        bindings = self._api_any("GET", "/api/exchanges/%2F/amq.topic/bindings/source")
        return sorted({b["destination"] for b in bindings if b["destination_type"] == "queue"
                       and binding_matches(b["routing_key"], key)})

    def queue_depth(self, name: str) -> int:
        """Messages in queue `name`, from the management statistics: for a quorum queue on
        3.10 about 5 s behind (measured 5.2 s, 9 s before the 1 s tick). For a progress
        line; to count, `read_queue`, which is exact."""
        return int(self.queue_info(name).get("messages", 0))

    def read_queue(self, name: str, max_messages: int = 10_000) -> list[tuple[str, bytes]]:
        """Take up to `max_messages` from queue `name` and remove them (an independent
        consumer: basic.get with ack through the management API), as (routing key, payload),
        oldest first; fewer, or none, once it is empty."""
        q = urllib.parse.quote(name, safe="")
        got = self._api_any("POST", f"/api/queues/%2F/{q}/get",
                            {"count": max_messages, "ackmode": "ack_requeue_false",
                             "encoding": "base64"})
        return [(m["routing_key"], base64.b64decode(m["payload"]) if m["payload_encoding"]
                 == "base64" else m["payload"].encode()) for m in got]

    def purge_queue(self, name: str) -> None:
        self._api_any("DELETE", f"/api/queues/%2F/{urllib.parse.quote(name, safe='')}/contents")

    def delete_queue(self, name: str) -> None:
        self._api_any("DELETE", f"/api/queues/%2F/{urllib.parse.quote(name, safe='')}")

    def drain_queue(self, name: str, batch: int = 5_000) -> list[tuple[str, bytes]]:
        """Everything in queue `name` now, removed."""
        out: list[tuple[str, bytes]] = []
        while chunk := self.read_queue(name, batch):
            out += chunk
        return out

    # -- the management API --------------------------------------------------------------
    def _api_any(self, method: str, path: str, body: object = None) -> Any:
        """Ask the running nodes in turn, first answer wins."""
        errors = []
        for node in self.nodes:
            if not self.running(node.name):
                continue
            try:
                return self._api(node, method, path, body)
            except RabbitError as e:
                errors.append(str(e))
        raise RabbitError("no RabbitMQ node answered: " + "; ".join(errors or ["none runs"]))

    def _api(self, node: RabbitNode, method: str, path: str, body: object = None) -> Any:
        url = f"http://{node.ip}:{MANAGEMENT_PORT}{path}"
        data = None if body is None else json.dumps(body).encode()
        auth = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request = urllib.request.Request(url, data, method=method, headers={
            "Authorization": f"Basic {auth}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            raise RabbitError(f"{method} {url}: {e.code} {e.read()[:300]!r}") from None
        except OSError as e:
            raise RabbitError(f"{method} {url}: {e}") from None
        return json.loads(raw) if raw else None
