"""The delivery witness, a process of its own (`main()`, started by
`gateway/tools/sim/processes.py`): it subscribes to the gateway's uplink and dead-letter topics
before the fleet starts, stamps the arrival of every uplink message and streams
`(device_id, seq, arrival)` to the fleet process that sent it, which books it.

Why a process: on the fleet's busy event loop the witness read the broker late, and the
fleet's own backlog showed up as delivery latency (29 s p50 while the gateway's spool held
~50 records; docs/decisions.md). Here it does nothing but read: our lean MQTT client
(gateway/mqtt/client.py), one JSON parse per message, QoS 1 like a real consumer (a broker that
caps per-client queues, like mosquitto's default max_queued_messages 1000, can still drop
for a slow subscriber: configure it unlimited). It never publishes anything.

Clock: arrivals are CLOCK_MONOTONIC (`time.monotonic()`), which Linux keeps system-wide,
so they compare directly with the fleet processes' send times on the same host.

On the feeds, one batch of messages read together is a line `@{arrival}` followed by a
line `{device_id} {seq}` per uplink (ASCII; device ids hold no spaces).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import ssl
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field

import uvloop

from gateway.config import MqttSection
from gateway.mqtt.client import Incoming, MqttClient, MqttError
from gateway.tools.sim.channel import Parent
from gateway.tools.sim.lag import LagMonitor

FLUSH_EVERY_S = 0.02  # feeds are written in batches: a write per batch, not per message
ACK_GROUP = 16  # PUBACKs sent together (Witness._acknowledge)
ACK_DELAY_S = 0.005


@dataclass(frozen=True)
class WitnessSpec:
    mqtt: MqttSection
    uplink_filter: str
    invalid_topic: str
    feed_fds: tuple[int, ...]  # write ends of the pipes to the fleet processes, in order


@dataclass
class WitnessStats:
    messages: int = 0
    uplinks: int = 0
    unparsable: int = 0  # not JSON, or an uplink without device_id and integer seq
    dead_letters_by_reason: Counter[str] = field(default_factory=Counter)
    lag_ms: array[float] = field(default_factory=lambda: array("d"))
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0


class Feeds:
    """The pipes to the fleet processes, written in batches through asyncio transports
    (buffered: a slow reader never blocks the witness)."""

    def __init__(self, transports: list[asyncio.WriteTransport]) -> None:
        self._transports = transports
        self._pending: list[list[str]] = [[] for _ in transports]
        self._scheduled = False

    @classmethod
    async def open(cls, fds: tuple[int, ...]) -> Feeds:
        loop = asyncio.get_running_loop()
        transports = []
        for fd in fds:
            transport, _ = await loop.connect_write_pipe(asyncio.BaseProtocol,
                                                         os.fdopen(fd, "wb", buffering=0))
            transports.append(transport)
        return cls(transports)

    def __len__(self) -> int:
        return len(self._transports)

    def add(self, index: int, lines: list[str]) -> None:
        self._pending[index] += lines
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(FLUSH_EVERY_S, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        for transport, lines in zip(self._transports, self._pending, strict=True):
            if lines and not transport.is_closing():
                transport.write("".join(lines).encode())
            lines.clear()

    def close(self) -> None:
        self.flush()
        for transport in self._transports:
            transport.close()


class Witness:
    def __init__(self, spec: WitnessSpec, client: MqttClient, feeds: Feeds) -> None:
        self.spec = spec
        self.client = client
        self.feeds = feeds
        self.stats = WitnessStats()
        self.route: dict[str, int] = {}
        self.cpu_at_start = 0.0
        self._unacked: list[Incoming] = []
        self._ack_handle: asyncio.TimerHandle | None = None

    async def consume(self) -> None:
        """Read, stamp, acknowledge and forward until cancelled."""
        queue = self.client.messages
        while True:
            batch = [await queue.get()]
            arrival = time.monotonic()
            while not queue.empty():
                batch.append(queue.get_nowait())
            self._book(batch, f"@{arrival!r}\n")
            self._acknowledge(batch)

    def _acknowledge(self, batch: list[Incoming]) -> None:
        """PUBACK in groups: each TCP send to the broker cost ~18 µs, half the witness's
        CPU per message at 2,000/s, when every message had its own. A group leaves once
        ACK_GROUP messages wait, or ACK_DELAY_S after the first, so a broker that allows
        fewer messages in flight per client than ACK_GROUP (mosquitto's default is 20;
        the demo's, unlimited) waits at most ACK_DELAY_S for room."""
        self._unacked += batch
        if len(self._unacked) >= ACK_GROUP:
            self.flush_acks()
        elif self._ack_handle is None:
            self._ack_handle = asyncio.get_running_loop().call_later(ACK_DELAY_S, self.flush_acks)

    def flush_acks(self) -> None:
        if self._ack_handle is not None:
            self._ack_handle.cancel()
            self._ack_handle = None
        unacked, self._unacked = self._unacked, []
        for message in unacked:  # written in one go: the client sends a loop turn's packets together
            self.client.ack(message)

    def _book(self, batch: list[Incoming], stamp_line: str) -> None:
        stats, route, invalid = self.stats, self.route, self.spec.invalid_topic
        single = len(self.feeds) == 1
        per_feed: dict[int, list[str]] = {}
        stats.messages += len(batch)
        for message in batch:
            if message.topic == invalid:
                self._dead_letter(message.payload)
                continue
            key = uplink_key(message.topic, message.payload)
            if key is None:
                stats.unparsable += 1
                continue
            device_id, seq = key
            stats.uplinks += 1
            index = 0 if single else route.get(device_id, 0)  # unknown: foreign, at feed 0
            lines = per_feed.get(index)
            if lines is None:
                lines = per_feed[index] = [stamp_line]
            lines.append(f"{device_id} {seq}\n")
        for index, lines in per_feed.items():
            self.feeds.add(index, lines)

    def _dead_letter(self, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except ValueError:
            body = None
        if isinstance(body, dict):
            self.stats.dead_letters_by_reason[str(body.get("reason"))] += 1
        else:
            self.stats.unparsable += 1


# An uplink message's `"seq":` can only be a key (a quote inside a JSON string is escaped),
# and only the top-level one (seq is a reserved field name): a search is exact, and ~3 µs
# cheaper than json.loads of the whole message.
_SEQ = re.compile(rb'"seq"\s*:\s*(-?[0-9]+)\s*[,}]')


def uplink_key(topic: str, payload: bytes) -> tuple[str, int] | None:
    """(device_id, seq) of an uplink message on `{prefix}/{tenant}/{type}/{device_id}/up`,
    None when it has no integer seq (then it is not one of the simulator's)."""
    parts = topic.rsplit("/", 2)
    found = _SEQ.search(payload)
    if len(parts) != 3 or found is None or not parts[1] or " " in parts[1]:
        return None
    return parts[1], int(found.group(1))


async def serve(parent: Parent) -> int:
    """The witness's life: spec in, subscribe, route in, read until the parent closes."""
    spec: WitnessSpec = await parent.receive()
    mqtt = spec.mqtt
    tls = None
    if mqtt.tls:
        tls = ssl.create_default_context(cafile=str(mqtt.tls_ca_file) if mqtt.tls_ca_file else None)
    try:
        client = await MqttClient.connect(
            mqtt.host, mqtt.port, client_id=f"nbiot-sim-witness-{os.getpid()}-{os.urandom(3).hex()}",
            keepalive_s=mqtt.keepalive_s, username=mqtt.username,
            password=mqtt.password.get_secret_value() if mqtt.password else None, tls=tls)
        await client.subscribe(spec.uplink_filter, qos=1)
        await client.subscribe(spec.invalid_topic, qos=1)
    except MqttError as e:
        parent.send(("failed", f"cannot subscribe at broker {mqtt.host}:{mqtt.port}: {e}"))
        return 1
    feeds = await Feeds.open(spec.feed_fds)
    witness = Witness(spec, client, feeds)
    lag = LagMonitor()
    lag.start()
    parent.send(("subscribed", None))
    consumer = asyncio.create_task(witness.consume(), name="sim-witness")
    stopped = asyncio.ensure_future(_route_then_wait_for_eof(parent, witness))
    try:
        await asyncio.wait({stopped, client.closed}, return_when=asyncio.FIRST_COMPLETED)
        if client.closed.done() and not stopped.done():
            error = client.closed.exception()
            parent.send(("failed", f"the witness lost its broker connection: {error}"))
            return 1
    finally:
        lag.stop()
        consumer.cancel()
        witness.flush_acks()
        stopped.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        feeds.close()
        if not client.closed.done():
            await client.disconnect()
    stats = witness.stats
    stats.lag_ms = lag.samples_ms
    stats.cpu_s = time.process_time() - witness.cpu_at_start
    stats.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    parent.send(("stats", stats))
    return 0


async def _route_then_wait_for_eof(parent: Parent, witness: Witness) -> None:
    """The route (device ids by fleet process) arrives once the fleet is built; the end
    of stdin means stop."""
    with contextlib.suppress(EOFError):
        ids_by_feed: list[list[str]] = await parent.receive()
        witness.route = {device_id: i for i, ids in enumerate(ids_by_feed) for device_id in ids}
        witness.cpu_at_start = time.process_time()  # the run's cost, not the imports'
        parent.send(("routed", None))
        while True:
            await parent.receive()


def main() -> int:
    async def run() -> int:
        return await serve(await Parent().open())

    return uvloop.run(run())

