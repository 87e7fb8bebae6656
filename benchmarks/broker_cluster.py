"""The broker's QoS 1 rate with a bare publisher, side by side: mosquitto alone, a 1-node
RabbitMQ with a classic durable queue and with a quorum queue, the 3-node cluster with a
quorum queue (one publisher on one node, then one on each node), and PUBACK latency at a
fixed open-loop rate on the cluster. Root (the cluster runs in lab namespaces).

Every run: `--messages` QoS 1 PUBLISHes of ~250-byte uplink-shaped JSON, at most `--window`
awaiting PUBACK per publisher (our client, gateway/mqtt/client.py, as the gateway publishes); the
rate is messages over the time from the first PUBLISH to the last PUBACK. A PUBACK from
RabbitMQ here means the bound queue has the message (quorum: a Raft majority fsynced it);
mosquitto queues it in memory for an offline durable session (persistence off, as in the
tests). Everything, publisher included, shares this machine's 2 cores.

Run: flock /tmp/nbg-heavy.lock .venv/bin/python benchmarks/broker_cluster.py [--messages 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.mqtt.client import MqttClient
from gateway.tools import localstack
from gateway.tools.bench.flood import publish_windowed
from gateway.tools.demo import MOSQUITTO_CONF
from gateway.tools.lab.netns import Lab
from gateway.tools.lab.rabbit import RabbitCluster

TOPIC = "nbiot/plant/env_th/{}/up"
BINDING = "nbiot.plant.*.*.up"
QUEUE = "uplinks"
DEVICES = 10_000


def payload(i: int) -> bytes:
    device = f"dev-{i % DEVICES:05d}"
    return json.dumps({
        "device_id": device, "device_type": "env_th", "tenant": "plant", "gateway_id": "gw1",
        "seq": i, "received_at": "2026-12-01T05:12:44.347Z",
        "readings": {"temperature": {"value": 21.5, "unit": "Cel"},
                     "humidity": {"value": 40.2, "unit": "%RH"}}, "transport": "coap"},
        separators=(",", ":")).encode()


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    username: str | None = None
    password: str | None = None


async def connect(target: Target, client_id: str, clean_session: bool = True) -> MqttClient:
    return await MqttClient.connect(target.host, target.port, client_id=client_id,
                                    username=target.username, password=target.password,
                                    clean_session=clean_session, keepalive_s=60)


async def flood(target: Target, first: int, n: int, window: int, client_id: str) -> float:
    """Publish messages first..first+n-1 as fast as PUBACKs allow; the time of the last PUBACK."""
    client = await connect(target, client_id)
    messages = ((TOPIC.format(f"dev-{i % DEVICES:05d}"), payload(i)) for i in range(first, first + n))
    finished = await publish_windowed(client, messages, n, window)
    await client.disconnect()
    return finished


async def rate_of(targets: list[Target], n: int, window: int) -> float:
    """Messages per second, `n` split over one publisher per target, run at once."""
    share = n // len(targets)
    started = time.monotonic()
    ends = await asyncio.gather(*(flood(t, k * share, share, window, f"bench-{k}")
                                  for k, t in enumerate(targets)))
    return share * len(targets) / (max(ends) - started)


async def paced_latency(target: Target, rate: float, duration_s: float) -> tuple[float, float, int]:
    """PUBACK latency at a fixed open-loop rate (sent on schedule in 10 ms ticks, whatever
    is in flight): (p50 s, p99 s, messages)."""
    client = await connect(target, "bench-paced")
    latencies: list[float] = []
    n = int(rate * duration_s)
    done = asyncio.get_running_loop().create_future()

    def acked_at(sent: float) -> Callable[[], None]:
        def on_ack() -> None:
            latencies.append(time.monotonic() - sent)
            if len(latencies) == n:
                done.set_result(None)
        return on_ack

    started = time.monotonic()
    i = 0
    while i < n:
        due = min(n, int((time.monotonic() - started) * rate) + 1)
        now = time.monotonic()
        for j in range(i, due):
            client.publish(TOPIC.format(f"dev-{j % DEVICES:05d}"), payload(j), 1, False,
                           acked_at(now))
        i = due
        await asyncio.sleep(0.01)
    await asyncio.wait_for(done, 60)
    await client.disconnect()
    cuts = statistics.quantiles(latencies, n=100)
    return cuts[49], cuts[98], n


def settle(cluster: RabbitCluster, expected: int) -> int:
    """The queue's depth once it shows `expected` (statistics lag ~5 s), then emptied."""
    deadline = time.monotonic() + 30
    depth = cluster.queue_depth(QUEUE)
    while depth < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        depth = cluster.queue_depth(QUEUE)
    cluster.purge_queue(QUEUE)
    return depth


def rabbit_target(cluster: RabbitCluster, address: str) -> Target:
    host, port = address.split(":")
    return Target(host, int(port), cluster.user, cluster.password)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--window", type=int, default=1_000, help="in flight per publisher")
    parser.add_argument("--rate", type=float, default=700.0, help="the paced run's messages/s")
    parser.add_argument("--duration", type=float, default=20.0, help="the paced run's seconds")
    args = parser.parse_args()
    n, window = args.messages, args.window
    rates: dict[str, float] = {}

    def report(name: str, rate: float, queued: int | None = None) -> None:
        rates[name] = rate
        base = rates[next(iter(rates))]
        seen = "" if queued is None else f"; {queued:,} in the queue after"
        print(f"{name:58} {rate:8,.0f} msg/s  ({rate / base:.2f}x mosquitto){seen}", flush=True)

    print(f"{n:,} QoS 1 messages of {len(payload(0))} bytes, {window:,} in flight per "
          "publisher", flush=True)
    with tempfile.TemporaryDirectory(prefix="nbiot-bench-broker-") as tmp:
        with localstack.mosquitto(Path(tmp), MOSQUITTO_CONF) as broker:
            target = Target(localstack.LOOPBACK, broker.port)

            async def mosquitto_run() -> float:
                # an offline durable session subscribed to the uplinks: mosquitto queues each
                subscriber = await connect(target, "bench-queue", clean_session=False)
                await subscriber.subscribe("nbiot/plant/+/+/up", 1)
                await subscriber.disconnect()
                return await rate_of([target], n, window)

            report("(a) mosquitto, 1 node", asyncio.run(mosquitto_run()))

        with Lab("nbbench", hosts=1, brokers=3, net=None) as lab:
            with RabbitCluster(lab, nodes=1) as single:
                print(f"    1-node RabbitMQ serving after {single.start_seconds['b1']:.1f} s",
                      flush=True)
                b1 = rabbit_target(single, single.mqtt_addresses()[0])
                single.declare_uplink_queue(QUEUE, BINDING, queue_type="classic")
                report("(b) RabbitMQ 1 node, classic durable queue",
                       asyncio.run(rate_of([b1], n, window)), settle(single, n))
                single.delete_queue(QUEUE)
                single.declare_uplink_queue(QUEUE, BINDING)
                report("(b') RabbitMQ 1 node, quorum queue",
                       asyncio.run(rate_of([b1], n, window)), settle(single, n))
            with RabbitCluster(lab, nodes=3) as cluster:
                started = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(cluster.start_seconds.items()))
                print(f"    3-node RabbitMQ serving after {started} (started at once)", flush=True)
                cluster.declare_uplink_queue(QUEUE, BINDING)
                leader = cluster.queue_info(QUEUE)["leader"]
                targets = [rabbit_target(cluster, a) for a in cluster.mqtt_addresses()]
                report(f"(c) 3 nodes, quorum queue, 1 publisher on b1 (leader {leader.split('@')[1]})",
                       asyncio.run(rate_of(targets[:1], n, window)), settle(cluster, n))
                report("(d) 3 nodes, quorum queue, a publisher on each",
                       asyncio.run(rate_of(targets, n, window)), settle(cluster, n // 3 * 3))
                p50, p99, sent = asyncio.run(paced_latency(targets[0], args.rate, args.duration))
                print(f"(c) at {args.rate:,.0f} msg/s open loop for {args.duration:g} s "
                      f"({sent:,} messages): PUBACK p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms",
                      flush=True)
                settle(cluster, sent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
