"""The channel between gateway hosts: heartbeats, datagrams to their device's owner, the
owner's replies back to the host the device talks to, and the seqs a host accepted for
devices it hands on to their next owner.

UDP between the addresses `cluster.hosts` names (worker i of a host on its port + i). A
host that receives a datagram for a device another live host owns sends it there
unchanged (F); the owner's CoAP server handles it as its own, and its reply goes back
(R) to the receiving host, which sends it to the device from its socket: the balancer's
flow for the device ends there, and the device sees one server. A relayed datagram is
never relayed again (one hop), so hosts that briefly disagree on an owner cannot bounce
it. Every message carries an HMAC-SHA256 with `cluster.secret` and must come from its
sender's configured address: anything else is dropped and counted, unread. The owner
validates a relayed uplink exactly as one it received itself (the datagram is the
device's own), so a peer can never make it accept anything it did not check. A handover
(S, gateway/cluster/handover.py) is acknowledged (K) and sent again each heartbeat until it
is, for HANDOVER_TRIES beats; the receiver acts on each message id once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import logging
import random
import socket
import struct
import time
from collections.abc import Callable

from gateway.cluster import handover
from gateway.cluster.membership import Membership, rank
from gateway.config import ClusterSection
from gateway.ingest.coap import wire
from gateway.ingest.coap.server import Address, request_path, uplink_device_id
from gateway.runtime.metrics import Metrics
from gateway.runtime.workers import owner as owner_worker

log = logging.getLogger(__name__)

VERSION = 1
_HEARTBEAT, _FORWARD, _REPLY, _SEQS, _SEQS_ACK = b"H", b"F", b"R", b"S", b"K"
_HEAD = struct.Struct("!BcB")  # version, kind, sender name length; the name follows
_WORKER = struct.Struct("!B")  # the sending worker, after the name
_BEAT = struct.Struct("!dB")  # incarnation (the sender's start time), its gateway.workers
_ADDR = struct.Struct("!HB")  # device port, device host length; the host follows
_MESSAGE_ID = struct.Struct("!Q")  # a handover's id (random: a restarted sender's are new)
HANDOVER_TRIES = 20  # heartbeats a handover is sent for without its K (10 s by default)
MAX_UNACKED = 10_000  # handover messages awaiting their K: ~40 devices each
SEEN_HANDOVERS = 4096  # message ids remembered, so a resent one is not counted twice
MAC_BYTES = 16
BUFFER_BYTES = 4 << 20

# Delivers a datagram (the device's, or a reply to it) with the device's address.
Deliver = Callable[[bytes, Address], None]
# A handover from a peer host: (its name, device id -> the span of seqs it accepted).
HandedOver = Callable[[str, dict[str, handover.Span]], None]


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
        self._handed_over: HandedOver | None = None
        # message id -> (kind and body, peer, worker, tries left): handovers awaiting a K
        self._unacked: dict[int, tuple[bytes, str, int, int]] = {}
        self._seen: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        for name in self._peers:
            metrics.cluster_peer_up.labels(name).set(0)
        metrics.cluster_hosts_alive.set(1)
        membership.on_change.append(self._membership_changed)

    async def start(self, relayed: Deliver, send_to_device: Deliver,
                    handed_over: HandedOver | None = None) -> str:
        """Bind this worker's peer port and start the heartbeats; returns where it listens."""
        self._relayed, self._send_to_device = relayed, send_to_device
        self._handed_over = handed_over
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

    # -- handing devices on -------------------------------------------------------------
    def hand_over(self, host: str, spans: dict[str, handover.Span]) -> int:
        """Send `host` the seqs this worker accepted for devices it now owns, each to the
        worker owning it there; resent each heartbeat until acknowledged. Returns the
        number of messages."""
        workers = self.membership.workers.get(host, 1)
        by_worker: dict[int, dict[str, handover.Span]] = {}
        for device_id, span in spans.items():
            by_worker.setdefault(owner_worker(device_id, workers), {})[device_id] = span
        sent = 0
        for worker, part in by_worker.items():
            for body in handover.encode(part):
                if len(self._unacked) >= MAX_UNACKED:
                    self._metrics.cluster_handovers_lost.inc()
                    continue
                message_id = random.getrandbits(64)
                message = _MESSAGE_ID.pack(message_id) + body
                self._unacked[message_id] = (message, host, worker, HANDOVER_TRIES)
                self._send_handover(message, host, worker)
                sent += 1
        return sent

    def _send_handover(self, message: bytes, host: str, worker: int) -> None:
        peer_host, peer_port = self._peers[host]
        self._send(_SEQS, message, (peer_host, peer_port + worker))

    def _resend_handovers(self) -> None:
        for message_id, (message, host, worker, tries) in list(self._unacked.items()):
            if tries <= 1:
                del self._unacked[message_id]
                self._metrics.cluster_handovers_lost.inc()
                log.warning("cluster: %s did not acknowledge a handover of seqs in %d tries: "
                            "a duplicate of its devices may go uncounted", host, HANDOVER_TRIES)
                continue
            self._unacked[message_id] = (message, host, worker, tries - 1)
            self._send_handover(message, host, worker)

    def _receive_handover(self, sender: str, worker: int, body: bytes) -> bool:
        """An S: act on it once (per message id), acknowledge it every time."""
        if len(body) < _MESSAGE_ID.size:
            return False
        (message_id,) = _MESSAGE_ID.unpack_from(body)
        try:
            spans = handover.decode(body[_MESSAGE_ID.size:])
        except ValueError as e:
            log.debug("cluster: malformed handover from %s: %s", sender, e)
            return False
        peer_host, peer_port = self._peers[sender]
        self._send(_SEQS_ACK, body[:_MESSAGE_ID.size], (peer_host, peer_port + worker))
        key = (sender, message_id)
        if key in self._seen:
            return True
        self._seen[key] = None
        if len(self._seen) > SEEN_HANDOVERS:
            self._seen.popitem(last=False)
        if self._handed_over is not None:
            self._handed_over(sender, spans)
        return True

    # -- heartbeats --------------------------------------------------------------------
    async def _beat(self) -> None:
        interval_s = self._cluster.heartbeat_interval_s
        body = _BEAT.pack(self._incarnation, self._workers)
        while True:
            for name, (host, port) in self._peers.items():
                for worker in range(self.membership.workers.get(name, 1)):
                    self._send(_HEARTBEAT, body, (host, port + worker), count_failure=False)
            self.membership.check()
            if self._unacked:
                self._resend_handovers()
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
        try:
            understood = self._act(kind, sender, worker, body)
        except (struct.error, ValueError) as e:  # a peer's bug, not an attack: it has the key
            log.debug("cluster: malformed %r message from %s: %s", kind, sender, e)
            understood = False
        if not understood:
            rejected.labels("malformed").inc()

    def _act(self, kind: bytes, sender: str, worker: int, body: bytes) -> bool:
        """An authentic message from `sender`'s `worker`; False if it makes no sense."""
        if kind == _HEARTBEAT:
            incarnation, workers = _BEAT.unpack(body)
            self.membership.heard(sender, incarnation, max(1, workers), worker)
        elif kind == _FORWARD:
            device, datagram = _device_address(body)
            assert self._relayed is not None
            self._metrics.cluster_relayed.inc()
            self._relayed(datagram, (device[0], device[1], self.reply_via(sender, worker)))
        elif kind == _REPLY:
            device, reply = _device_address(body)
            assert self._send_to_device is not None
            self._send_to_device(reply, device)
        elif kind == _SEQS:
            return self._receive_handover(sender, worker, body)
        elif kind == _SEQS_ACK:
            if len(body) != _MESSAGE_ID.size:
                return False
            self._unacked.pop(_MESSAGE_ID.unpack(body)[0], None)
        else:
            return False
        return True

    # -- what the membership means for this worker's devices ----------------------------
    def taken_over(self, owned: set[str]) -> set[str]:
        """The devices this host `owned` that are here because their home host (the first
        in rank over every configured host) is not heard."""
        hosts = self.membership.hosts
        return {device_id for device_id in owned if rank(device_id, hosts)[0] != self.me}


def _device_address(body: bytes) -> tuple[tuple[str, int], bytes]:
    port, host_len = _ADDR.unpack_from(body)
    start = _ADDR.size
    host = body[start:start + host_len]
    if len(host) != host_len:
        raise ValueError("truncated device address")
    return (host.decode(), port), body[start + host_len:]


def _unmapped(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") else host


def _resolve(host: str) -> set[str]:
    """The addresses a configured peer name may send from."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        return {host}
    return {_unmapped(str(info[4][0])) for info in infos} | {host}
