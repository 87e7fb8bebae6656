"""The channel between gateway hosts: heartbeats, datagrams to their device's owner, and
the owner's replies back to the host the device talks to.

UDP between the addresses `cluster.hosts` names (worker i of a host on its port + i). A
host that receives a datagram for a device another live host owns sends it there
unchanged (F); the owner's CoAP server handles it as its own, and its reply goes back
(R) to the receiving host, which sends it to the device from its socket: the balancer's
flow for the device ends there, and the device sees one server. A relayed datagram is
never relayed again (one hop), so hosts that briefly disagree on an owner cannot bounce
it. Every message carries an HMAC-SHA256 with `cluster.secret` and must come from its
sender's configured address: anything else is dropped and counted, unread. The owner
validates a relayed uplink exactly as one it received itself (the datagram is the
device's own), so a peer can never make it accept anything it did not check.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import socket
import struct
import time
from collections.abc import Callable

from gateway.cluster.membership import Membership, rank
from gateway.config import ClusterSection
from gateway.ingest.coap import wire
from gateway.ingest.coap.server import Address, request_path, uplink_device_id
from gateway.runtime.metrics import Metrics
from gateway.runtime.workers import owner as owner_worker

log = logging.getLogger(__name__)

VERSION = 1
_HEARTBEAT, _FORWARD, _REPLY = b"H", b"F", b"R"
_HEAD = struct.Struct("!BcB")  # version, kind, sender name length; the name follows
_WORKER = struct.Struct("!B")  # the sending worker, after the name
_BEAT = struct.Struct("!dB")  # incarnation (the sender's start time), its gateway.workers
_ADDR = struct.Struct("!HB")  # device port, device host length; the host follows
MAC_BYTES = 16
BUFFER_BYTES = 4 << 20

# Delivers a datagram (the device's, or a reply to it) with the device's address.
Deliver = Callable[[bytes, Address], None]


class PeerChannel(asyncio.DatagramProtocol):
    """One worker's end of the channel. `start()` binds it; `route` is the CoAP server's
    router; `relayed` gets what peers forward; `send_to_device` sends replies on."""

    def __init__(self, cluster: ClusterSection, worker: int, workers: int, metrics: Metrics,
                 membership: Membership) -> None:
        assert cluster.host is not None and cluster.secret is not None  # config checked
        self.me = cluster.host
        self._cluster = cluster
        self._worker = worker
        self._workers = workers
        self._metrics = metrics
        self.membership = membership
        self._key = cluster.secret.get_secret_value().encode()
        self._name = self.me.encode()
        self._peers = {name: cluster.peer_address(name) for name in cluster.hosts
                       if name != self.me}
        self._sources = {name: _resolve(host) for name, (host, _) in self._peers.items()}
        self._incarnation = time.time()
        self._transport: asyncio.DatagramTransport | None = None
        self._relayed: Deliver | None = None
        self._send_to_device: Deliver | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        for name in self._peers:
            metrics.cluster_peer_up.labels(name).set(0)
        metrics.cluster_hosts_alive.set(1)
        membership.on_change.append(self._membership_changed)

    async def start(self, relayed: Deliver, send_to_device: Deliver) -> str:
        """Bind this worker's peer port and start the heartbeats; returns where it listens."""
        self._relayed, self._send_to_device = relayed, send_to_device
        host, port = self._cluster.peer_address(self.me)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_DGRAM)
        try:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_BYTES)
            sock.bind((host, port + self._worker))
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"cluster: cannot bind the peer channel on udp {host} port "
                          f"{port + self._worker} (cluster.hosts.{self.me}): {e.strerror}"
                          ) from None
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, sock=sock)
        self._heartbeat = asyncio.create_task(self._beat(), name="cluster-heartbeat")
        return f"cluster peer channel udp {host} port {port + self._worker}"

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._transport is not None:
            self._transport.close()

    # -- routing: the CoAP server's router ---------------------------------------------
    def route(self, msg: wire.Message, data: bytes, addr: Address) -> bool:
        """Send an uplink for another live host's device there; False: ours to handle."""
        device_id = uplink_device_id(request_path(msg))
        if not device_id:
            return False
        host = self.membership.owner(device_id)
        if host == self.me:
            return False
        device_host = str(addr[0]).encode()
        worker = owner_worker(device_id, self.membership.workers.get(host, 1))
        peer_host, peer_port = self._peers[host]
        if self._send(_FORWARD, b"".join((_ADDR.pack(addr[1], len(device_host)), device_host,
                                           data)), (peer_host, peer_port + worker)):
            self._metrics.cluster_forwarded.inc()
        return True

    def reply_via(self, origin: str, worker: int) -> Callable[[bytes, Address], None]:
        """How a reply to a datagram relayed by `origin`'s `worker` goes back."""
        peer_host, peer_port = self._peers[origin]
        target = (peer_host, peer_port + worker)

        def send(reply: bytes, addr: Address) -> None:
            host = str(addr[0]).encode()
            self._send(_REPLY, b"".join((_ADDR.pack(addr[1], len(host)), host, reply)), target)

        return send

    # -- heartbeats --------------------------------------------------------------------
    async def _beat(self) -> None:
        interval_s = self._cluster.heartbeat_interval_s
        body = _BEAT.pack(self._incarnation, self._workers)
        while True:
            for name, (host, port) in self._peers.items():
                for worker in range(self.membership.workers.get(name, 1)):
                    self._send(_HEARTBEAT, body, (host, port + worker), count_failure=False)
            self.membership.check()
            await asyncio.sleep(interval_s)

    def _membership_changed(self, before: tuple[str, ...], alive: tuple[str, ...]) -> None:
        self._metrics.cluster_membership_changes.inc()
        self._metrics.cluster_hosts_alive.set(len(alive))
        for name in self._peers:
            self._metrics.cluster_peer_up.labels(name).set(1 if name in alive else 0)

    # -- the wire ----------------------------------------------------------------------
    def _send(self, kind: bytes, body: bytes, target: tuple[str, int],
              count_failure: bool = True) -> bool:
        if self._transport is None or self._transport.is_closing():
            return False
        message = b"".join((_HEAD.pack(VERSION, kind, len(self._name)), self._name,
                            _WORKER.pack(self._worker), body))
        try:
            self._transport.sendto(message + self._mac(message), target)
        except OSError as e:
            if count_failure:
                self._metrics.cluster_forward_failed.inc()
                log.debug("cluster: cannot send to %s:%d: %s", target[0], target[1], e)
            return False
        return True

    def _mac(self, message: bytes) -> bytes:
        return hmac.new(self._key, message, hashlib.sha256).digest()[:MAC_BYTES]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a peer that is down: its heartbeats tell the rest.
        log.debug("cluster: peer channel error: %s", exc)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        try:
            self._receive(data, addr)
        except Exception:  # task boundary: a peer's message must never stop the channel
            log.exception("cluster: cannot handle a message from %s", addr[0])
            self._metrics.cluster_peer_rejected.labels("malformed").inc()

    def _receive(self, data: bytes, addr: Address) -> None:
        rejected = self._metrics.cluster_peer_rejected
        if len(data) < _HEAD.size + _WORKER.size + MAC_BYTES:
            rejected.labels("malformed").inc()
            return
        version, kind, name_len = _HEAD.unpack_from(data)
        start = _HEAD.size + name_len
        body_at = start + _WORKER.size
        if version != VERSION or len(data) < body_at + MAC_BYTES:
            rejected.labels("malformed").inc()
            return
        message, mac = data[:-MAC_BYTES], data[-MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(message)):
            rejected.labels("bad_mac").inc()
            return
        sender = data[_HEAD.size:start].decode("utf-8", "replace")
        if sender not in self._peers:
            rejected.labels("unknown_host").inc()
            return
        if _unmapped(str(addr[0])) not in self._sources[sender]:
            rejected.labels("wrong_source").inc()
            return
        (worker,) = _WORKER.unpack_from(data, start)
        body = message[body_at:]
        if kind == _HEARTBEAT:
            incarnation, workers = _BEAT.unpack(body)
            self.membership.heard(sender, incarnation, max(1, workers))
        elif kind == _FORWARD:
            device, datagram = _device_address(body)
            assert self._relayed is not None
            self._metrics.cluster_relayed.inc()
            self._relayed(datagram, (device[0], device[1], self.reply_via(sender, worker)))
        elif kind == _REPLY:
            device, reply = _device_address(body)
            assert self._send_to_device is not None
            self._send_to_device(reply, device)
        else:
            rejected.labels("malformed").inc()

    # -- what the membership means for this worker's devices ----------------------------
    def taken_over(self, owned: set[str]) -> int:
        """How many of the devices this host `owned` are here because their home host (the
        first in rank over every configured host) is not heard."""
        hosts = self.membership.hosts
        return sum(1 for device_id in owned if rank(device_id, hosts)[0] != self.me)


def _device_address(body: bytes) -> tuple[tuple[str, int], bytes]:
    port, host_len = _ADDR.unpack_from(body)
    start = _ADDR.size
    host = body[start:start + host_len].decode()
    return (host, port), body[start + host_len:]


def _unmapped(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") else host


def _resolve(host: str) -> set[str]:
    """The addresses a configured peer name may send from."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        return {host}
    return {_unmapped(str(info[4][0])) for info in infos} | {host}
