"""Every metric object of the gateway, and the HTTP endpoint that serves them.

Aggregates only: no per-device labels (40,000 devices). Names follow Prometheus
conventions: base units, `_total` for counters, `_seconds`, `_bytes`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from gateway import __version__

log = logging.getLogger(__name__)
NS = "nbiot_gateway"
# `*_created` series double the output and no dashboard here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]
WORKERS_HELP = ("Worker processes the gateway is configured to run (gateway.workers). "
                "Compare with nbiot_gateway_workers_up.")
WORKERS_UP_HELP = (
    "Worker processes whose metrics this scrape includes. Below nbiot_gateway_workers, a "
    "worker is not answering: the devices it owns get no reply, and the other series hold "
    "that worker's last known figures. See the journal of the service.")
# 10-50 ms in finer steps: the spool's commit linger (30 ms) puts acks at moderate load
# there, and the 50 ms ack target must be readable, not interpolated across 25-50 ms.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                     0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class DiskWrites(Collector):
    """Bytes this process had written to storage, read from /proc/self/io at each scrape:
    what the spool's commit policy is judged by (disk wear is an operating cost)."""

    NAME = f"{NS}_disk_write_bytes"

    def __init__(self, registry: CollectorRegistry, path: str = "/proc/self/io") -> None:
        self._path = path
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        try:
            with open(self._path) as f:
                fields = dict(line.split(": ", 1) for line in f.read().splitlines())
            written = float(fields["write_bytes"]) - float(fields.get("cancelled_write_bytes", 0))
        except (OSError, KeyError, ValueError):  # no /proc (or no task I/O accounting)
            return
        yield CounterMetricFamily(
            self.NAME, "Bytes this process wrote to storage (write_bytes less "
            "cancelled_write_bytes of /proc/self/io): the spool, liveness and downlink files. "
            "Divide its rate by the uplinks' to see what each costs the disk.", value=written)


class LoopCounter(Collector):
    """A counter updated once or more per uplink, from the event loop only: a plain number,
    without the lock and checks of prometheus_client's Counter (~1 µs an increment, a
    sixth of the metrics' share of an uplink's cost; docs/decisions.md)."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name, self._documentation = name, documentation
        self.value = 0.0
        registry.register(self)

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation)
        family.add_metric([], self.value)
        yield family


class LoopHistogram(Collector):
    """A histogram observed per uplink, from the event loop only: bucket counts in a list,
    exposed cumulative like prometheus_client's Histogram (`le` buckets, `+Inf`, sum)."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = [*buckets, math.inf]
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1  # le: bound included
        self._sum += value

    def collect(self) -> Iterator[Metric]:
        cumulative = list(itertools.accumulate(self._counts))
        family = HistogramMetricFamily(self._name, self._documentation, sum_value=self._sum,
                                       buckets=[(_le(b), float(c)) for b, c
                                                in zip(self._bounds, cumulative, strict=True)])
        yield family


def _le(bound: float) -> str:
    """A bucket's `le` label as prometheus_client's Histogram writes it ("0.005", "+Inf")."""
    return "+Inf" if math.isinf(bound) else repr(bound)


class Metrics:
    """All metric objects, registered in `registry` (tests pass a fresh one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        DiskWrites(r)
        Gauge(f"{NS}_build_info", "Version of the running gateway (value is always 1).",
              ["version"], registry=r).labels(__version__).set(1)
        self.uplinks_received = LoopCounter(
            f"{NS}_uplinks_received", "CoAP uplink requests received (retransmissions excluded).",
            r)
        self.uplinks_accepted = LoopCounter(
            f"{NS}_uplinks_accepted", "Uplinks durably spooled and answered 2.04.", r)
        self.uplinks_rejected = Counter(
            f"{NS}_uplinks_rejected", "Uplinks refused, by reason (see README: error codes).",
            ["reason"], registry=r)
        self.uplinks_duplicate = Counter(
            f"{NS}_uplinks_duplicate",
            "Uplinks whose (device, seq) was already accepted: answered 2.04, not forwarded again.",
            registry=r)
        self.coap_retransmissions = Counter(
            f"{NS}_coap_retransmissions",
            "CoAP retransmissions (same endpoint and message ID) answered from the reply cache.",
            registry=r)
        self.malformed_datagrams = Counter(
            f"{NS}_malformed_datagrams", "UDP datagrams that are not valid CoAP; dropped.",
            registry=r)
        self.dead_letters = Counter(
            f"{NS}_dead_letters", "Rejected uplinks kept on the invalid topic.", registry=r)
        self.dead_letters_dropped = Counter(
            f"{NS}_dead_letters_dropped",
            "Rejected uplinks not kept: dead-letter rate limit or spool space reserved for data.",
            registry=r)
        self.uplink_ack_seconds = LoopHistogram(
            f"{NS}_uplink_ack_seconds",
            "Time from receiving an uplink to sending its 2.04 (the record is durable).",
            LATENCY_BUCKETS_S, r)
        self.spool_commit_seconds = Histogram(
            f"{NS}_spool_commit_seconds",
            "Duration of one spool transaction (with its fsync); its _count is the spool's "
            "fsyncs. See spool.commit_linger_ms.",
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.spool_commit_records = Counter(
            f"{NS}_spool_committed_records", "Records made durable in the spool.", registry=r)
        self.spool_records = Gauge(
            f"{NS}_spool_records", "Records in the spool waiting for a broker PUBACK.", registry=r)
        self.spool_bytes = Gauge(
            f"{NS}_spool_bytes", "Bytes the spool accounts for (limit: spool.max_bytes).",
            registry=r)
        self.spool_max_bytes = Gauge(
            f"{NS}_spool_max_bytes", "Configured spool limit; at this size uplinks get 5.03.",
            registry=r)
        self.mqtt_published = Counter(
            f"{NS}_mqtt_published", "Messages published to the broker and acknowledged (PUBACK).",
            registry=r)
        self.mqtt_connected = Gauge(
            f"{NS}_mqtt_connected", "1 while the gateway holds a broker connection.", registry=r)
        self.mqtt_reconnects = Counter(
            f"{NS}_mqtt_reconnects", "Broker connections lost or refused, each followed by a retry.",
            registry=r)
        self.mqtt_publish_seconds = LoopHistogram(
            f"{NS}_mqtt_publish_seconds", "Time from sending a PUBLISH to its PUBACK.",
            LATENCY_BUCKETS_S, r)
        self.devices = Gauge(
            f"{NS}_devices", "Registered devices by liveness state (online, offline, never_seen).",
            ["state"], registry=r)
        self.device_state_changes = Counter(
            f"{NS}_device_state_changes", "Device liveness changes, by the state entered.",
            ["state"], registry=r)
        self.event_loop_lag_seconds = Gauge(
            f"{NS}_event_loop_lag_seconds",
            "How late the event loop ran a timer, last check; high means uplinks wait too.",
            registry=r)
        self.registry_devices = Gauge(
            f"{NS}_registry_devices", "Devices in the loaded registry.", registry=r)
        self.worker_forwarded = Counter(
            f"{NS}_worker_forwarded_datagrams",
            "Uplink datagrams handed to the worker process owning their device "
            "(gateway.workers > 1).", registry=r)
        self.worker_forward_dropped = Counter(
            f"{NS}_worker_forward_dropped",
            "Uplink datagrams for another worker dropped: its inbox was full (the device "
            "retransmits).", registry=r)
        # With gateway.workers > 1 the supervisor's merged /metrics sets both (a worker's
        # own values are dropped there); a single process reports 1 and 1.
        self.workers = Gauge(f"{NS}_workers", WORKERS_HELP, registry=r)
        self.workers_up = Gauge(f"{NS}_workers_up", WORKERS_UP_HELP, registry=r)
        # -- cluster (cluster.enabled) ------------------------------------------------------
        self.cluster_peer_up = Gauge(
            f"{NS}_cluster_peer_up",
            "1 while this host hears the peer gateway host's heartbeats, 0 once it has been "
            "silent for cluster.peer_dead_after_s: its devices are then served by the "
            "others. One series per configured peer host.", ["host"], registry=r)
        self.cluster_hosts_alive = Gauge(
            f"{NS}_cluster_hosts_alive",
            "Gateway hosts this host hears, itself included (compare with the configured "
            "count: a host that hears fewer may disagree with its peers on owners).",
            registry=r)
        self.cluster_devices_owned = Gauge(
            f"{NS}_cluster_devices_owned",
            "Registry devices this host owns now (judges their uplinks, liveness, "
            "downlinks).", registry=r)
        self.cluster_devices_taken_over = Gauge(
            f"{NS}_cluster_devices_taken_over",
            "Devices this host owns now because their home host is not heard: above 0, a "
            "host is down and this one serves its devices.", registry=r)
        self.cluster_forwarded = Counter(
            f"{NS}_cluster_forwarded_datagrams",
            "Uplink datagrams received here and sent on to the gateway host owning their "
            "device (the balancer hashes on addresses, not on devices).", registry=r)
        self.cluster_relayed = Counter(
            f"{NS}_cluster_relayed_datagrams",
            "Uplink datagrams another host forwarded here, to their device's owner.",
            registry=r)
        self.cluster_forward_failed = Counter(
            f"{NS}_cluster_forward_failed",
            "Datagrams or replies that could not be sent to a peer host (its address "
            "unreachable, a full socket buffer); the device retransmits.", registry=r)
        self.cluster_peer_rejected = Counter(
            f"{NS}_cluster_peer_messages_rejected",
            "Messages on the peer channel dropped unread, by reason: bad_mac (wrong "
            "cluster.secret or forged), unknown_host, wrong_source (not from the address "
            "cluster.hosts names), malformed.", ["reason"], registry=r)
        self.cluster_duplicates = Counter(
            f"{NS}_cluster_duplicates",
            "Uplinks two gateway hosts both accepted (each published it: it is on MQTT "
            "twice), found when one handed the device to the other after a takeover; each is "
            "logged and published on {prefix}/{tenant}/{type}/{device}/duplicates with its "
            "(device_id, seq).", registry=r)
        self.cluster_handovers_lost = Counter(
            f"{NS}_cluster_handovers_lost",
            "Handover messages (the seqs a host accepted for devices it gives back) a peer "
            "never acknowledged: a duplicate among their devices may go uncounted.",
            registry=r)
        self.cluster_membership_changes = Counter(
            f"{NS}_cluster_membership_changes",
            "Times the set of live hosts this host hears changed (devices moved).",
            registry=r)
        self.broker_ack_timeouts = Counter(
            f"{NS}_broker_ack_timeouts",
            "cluster.ack = broker: uplinks answered 5.03 because the broker did not PUBACK "
            "them within cluster.broker_ack_timeout_s (they stay spooled and are published; "
            "the device's retry is a duplicate).", registry=r)
        self.dtls_sessions = Gauge(
            f"{NS}_dtls_sessions",
            "coaps (DTLS) sessions held, handshakes that failed included (coaps.max_sessions).",
            registry=r)
        self.lwm2m_registrations = Gauge(
            f"{NS}_lwm2m_registrations",
            "LwM2M devices registered now (kept across restarts; a registration ends with "
            "De-register or when its lifetime runs out).", registry=r)
        self.lwm2m_registration_ops = Counter(
            f"{NS}_lwm2m_registration_requests",
            "LwM2M Register, Update and De-register requests, by op and result: ok, or the "
            "reason slug of the 4.xx/5.03 (also in nbiot_gateway_uplinks_rejected_total).",
            ["op", "result"], registry=r)
        self.lwm2m_lifetime_expired = Counter(
            f"{NS}_lwm2m_registrations_expired",
            "LwM2M registrations removed because the device did not Update within its "
            "lifetime (the device goes offline, saying so).", registry=r)
        self.lwm2m_requests = Counter(
            f"{NS}_lwm2m_device_requests",
            "Requests the gateway sent to LwM2M devices (commands and observations), by op "
            "and outcome: answered (any code: the result carries it) or unanswered (no "
            "answer after RFC 7252 retransmission; a command is tried again when the "
            "device next speaks).", ["op", "outcome"], registry=r)
        self.lwm2m_unmapped_resources = Counter(
            f"{NS}_lwm2m_unmapped_resources",
            "LwM2M resource values no field of the device's type maps ([types.X.lwm2m] "
            "fields): kept in the uplink's message under \"resources\", not validated.",
            registry=r)


    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class MetricsServer:
    """`/metrics`, `/healthz` and `/readyz` over HTTP/1.0, on the event loop. `exposition`
    gives the /metrics body; `ready` says whether uplinks are accepted, and why."""

    def __init__(self, exposition: Callable[[], Awaitable[bytes]],
                 ready: Callable[[], Awaitable[tuple[bool, str]]]) -> None:
        self._exposition = exposition
        self._ready = ready
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if path == "/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, await self._exposition()
            elif path == "/healthz":
                status, ctype, body = 200, "text/plain", b"ok\n"
            elif path == "/readyz":
                ok, why = await self._ready()
                status, ctype, body = (200 if ok else 503), "text/plain", (why + "\n").encode()
            else:
                status, ctype, body = 404, "text/plain", b"not found: try /metrics, /healthz, /readyz\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
