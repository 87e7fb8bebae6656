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
import logging
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from gateway.cluster.uplink_queue import binding_matches, mqtt_to_routing_key
from gateway.mqtt.client import MqttClient, MqttError
from gateway.tools.lab.netns import Lab, LabError

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
MQTT_PORT, AMQP_PORT, MANAGEMENT_PORT, DIST_PORT = 1883, 5672, 15672, 25672
# The whole start, repairs included: ~7 s a node alone; three at once on 2 shared cores
# 20-30 s, then the MQTT plugin node by node, ~10 s.
START_TIMEOUT_S = 120.0
# A node's MQTT plugin, once enabled, opens its listener within seconds (the second node
# waits for the first node's Raft election, ~5 s), and then takes MQTT CONNECTs at once; a
# refused CONNECT takes 5 s to say so. Past these, that node is restarted once (_repair).
MQTT_LISTENER_S = 30.0
MQTT_JOIN_S = 10.0
LOG_TAIL_LINES = 25
STOP_TIMEOUT_S = 15.0  # for a killed node to be gone
HTTP_TIMEOUT_S = 10.0
# The Erlang schedulers' busy-waiting burns idle cores; three nodes share two with everyone
# else (RabbitMQ's advice for shared hosts).
ERL_ARGS = "+sbwt none +sbwtdcpu none +sbwtdio none"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
log = logging.getLogger(__name__)


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
    namespaces b1..bN, started at once, clustered by classic peer discovery, then the MQTT
    plugin enabled node by node, yielded when every node runs in one cluster and accepts an
    MQTT CONNECT. MQTT on port 1883 of each node with `user`/`password`, durable MQTT
    sessions on quorum queues, the management API on port 15672."""

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
            deadline = started + START_TIMEOUT_S
            for node in self.nodes:
                self._start(node)
            with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
                list(pool.map(lambda n: self._wait_api(n, deadline), self.nodes))
            self._wait_members(deadline)
            for node in self.nodes:
                self._enable_mqtt(node, deadline)
                self.start_seconds[node.name] = time.monotonic() - started
            for node in self.nodes:
                self._wait_mqtt(node, deadline, repair=True)
        except BaseException:
            self._stop_all()
            raise
        return self

    def _enable_mqtt(self, node: RabbitNode, deadline: float) -> None:
        """Start the MQTT plugin on `node` (and keep it in its enabled_plugins for a restart)
        and wait for its listener. The nodes boot without it and get it one at a time, once
        they are one cluster: 3.10's plugin (mqtt_node:start/2) starts its client-ID Raft
        member, then asks its peers' members for the membership (100 s timeout) before it
        triggers an election, and opens its listener only after that. A member without a
        leader holds such a query until it knows one, so two nodes whose plugins start
        within the same moment hold each other's query and no one ever calls an election:
        the node logs "discovered 2 cluster peers that support client ID tracking" and its
        listener never opens (seen at a parallel start, docs/decisions.md). One at a time,
        the first finds no member to ask and calls the election; the others find its
        members and are in them already (every running node counts as a peer, since the
        plugin's code is on every node's path), so no join is sent either (a join that
        reaches a leader a moment after its election is dropped, and not retried)."""
        until = min(deadline, time.monotonic() + MQTT_LISTENER_S)
        argv = [str(RABBIT_BIN / "rabbitmq-plugins"), "-n", node.node, "enable", "rabbitmq_mqtt"]
        try:
            cli = self.lab.run(node.name, argv, env=self._env(node), check=False,
                               timeout_s=max(1.0, until - time.monotonic()))
        except LabError as e:  # still running at `until`: the listener will not open either
            raise self._error(node, f"rabbitmq-plugins enable rabbitmq_mqtt: {e}") from None
        if cli.returncode:  # not in its enabled_plugins either: a restart would not help
            raise self._error(node, f"rabbitmq-plugins enable rabbitmq_mqtt exited "
                              f"{cli.returncode}: {(cli.stderr or cli.stdout).strip()[-500:]}")
        if not _poll(lambda: _port_open(node.ip, MQTT_PORT), until):
            self._repair(node, f"its MQTT listener not open {MQTT_LISTENER_S:.0f} s after "
                         "the plugin was enabled", deadline)

    def _repair(self, node: RabbitNode, why: str, deadline: float) -> None:
        """The bounded recovery, once per node: kill -9 and start again (it rejoins the
        client-ID Raft group from its own data), or RabbitError with its log."""
        if node.name in self.mqtt_repairs:
            raise self._error(node, f"{why}, after a restart too")
        log.warning("RabbitMQ node %s (%s): %s; restarting it once (kill -9, start)",
                    node.node, node.name, why)
        self.mqtt_repairs.append(node.name)
        self.kill9(node.name)
        self._start(node)
        self._wait_serving(node, deadline)

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
            # rabbitmq_mqtt comes once the nodes are one cluster, one node at a time
            # (_enable_mqtt); rabbitmq-plugins adds it here for a restart.
            (node.datadir / "enabled_plugins").write_text("[rabbitmq_management].\n")
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

    def _wait_api(self, node: RabbitNode, deadline: float) -> None:
        self._wait(node, lambda: self._answers(node), deadline, "its management API")

    def _wait_serving(self, node: RabbitNode, deadline: float) -> None:
        """Until `node` serves the management API and (once the plugin is enabled) MQTT."""
        self._wait(node, lambda: _port_open(node.ip, MQTT_PORT) and self._answers(node),
                   deadline, "its MQTT listener and management API")

    def _answers(self, node: RabbitNode) -> bool:
        try:
            return bool(self._api(node, "GET", "/api/overview"))
        except RabbitError:
            return False

    def _wait(self, node: RabbitNode, condition: Callable[[], bool], deadline: float,
              what: str) -> None:
        proc = self._procs[node.name]

        def met() -> bool:
            if proc.poll() is not None:
                raise self._error(node, f"exited with {proc.returncode}")
            return condition()

        if not _poll(met, deadline):
            raise self._error(node, f"timed out waiting for {what}")

    def _error(self, node: RabbitNode, what: str) -> RabbitError:
        return RabbitError(f"RabbitMQ node {node.node} ({node.name}): {what}; the last lines "
                           f"of {node.datadir / 'server.log'}:\n{self.log_tail(node)}")

    def log_tail(self, node: RabbitNode, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = (node.datadir / "server.log").read_text(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(_ANSI.sub("", text).rstrip().splitlines()[-lines:])

    def wait_clustered(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until every node of the cluster that is not killed runs, seen from each, and
        accepts an MQTT CONNECT (client-ID tracking is a Raft group of its own)."""
        deadline = time.monotonic() + timeout_s
        self._wait_members(deadline)
        for node in self.nodes:
            if self.running(node.name):
                self._wait_mqtt(node, deadline)

    def _wait_members(self, deadline: float) -> None:
        expected = {n.node for n in self.nodes if self.running(n.name)}
        views: dict[str, str] = {}

        def clustered() -> bool:
            views.clear()  # this look's, not an earlier one's
            for node in self.nodes:
                if node.node not in expected:
                    continue
                try:
                    listed = self._api(node, "GET", "/api/nodes")
                except RabbitError as e:
                    views[node.name] = str(e)
                    return False
                running = {n["name"] for n in listed if n.get("running")}
                if running != expected:
                    views[node.name] = f"running {sorted(running)}"
                    return False
            return True

        if not _poll(clustered, deadline):
            laggard = next(n for n in self.nodes if n.name in views)
            raise self._error(laggard, f"not one cluster with {sorted(expected)} "
                              f"({views[laggard.name]})")

    def _wait_mqtt(self, node: RabbitNode, deadline: float, *, repair: bool = False) -> None:
        """Until `node` accepts an MQTT CONNECT; with `repair`, restarted once if it has not
        within MQTT_JOIN_S (a node left outside the client-ID Raft group refuses every
        CONNECT with "client ID registration timed out" in its log)."""
        connects = functools.partial(self._mqtt_connects, node)
        if _poll(connects, min(deadline, time.monotonic() + MQTT_JOIN_S) if repair else deadline):
            return
        if repair and node.name not in self.mqtt_repairs:
            self._repair(node, f"refused MQTT CONNECTs for {MQTT_JOIN_S:.0f} s", deadline)
            if _poll(connects, deadline):
                return
        raise self._error(node, "timed out waiting for it to accept an MQTT CONNECT")

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
        self._wait_serving(node, started + START_TIMEOUT_S)
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


def _poll(condition: Callable[[], bool], deadline: float) -> bool:
    """Poll `condition` every 50 ms until it holds (True) or `deadline` passes (False)."""
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _port_open(ip: str, port: int) -> bool:
    try:
        socket.create_connection((ip, port), 0.5).close()
    except OSError:
        return False
    return True
