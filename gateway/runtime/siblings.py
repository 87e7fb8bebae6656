"""A worker's channel to the other workers (gateway.workers > 1): datagrams and commands
for devices it does not own go to their owner.

Every worker has an inbox, an AF_UNIX datagram socket made by the supervisor before the
fork, and holds a sending end to every inbox. Three messages:
  U  an uplink datagram and the device's address: the owner handles it as if it had
     received it, and answers from its own socket on the shared port, so the device
     sees one server and its retransmissions meet one reply cache and one replay window;
  C  a downlink command worker 0 took from MQTT for another worker's device (and, in a
     cluster, whether this host announces it `queued`);
  A  the owner's answer to a C: stored or not. Worker 0 PUBACKs the command only after
     a stored answer, so a command is never acknowledged to the broker before it is
     durable, whichever worker keeps it.
  P  an uplink worker 0 took over coaps (DTLS sessions live there) for another worker's
     device: the owner's pipeline judges it, and
  V  its verdict goes back to worker 0, which answers the device in its DTLS session;
  S  in a cluster, a command state another host published (`confirmed`, `expired` on
     `.../down/ack`), heard by worker 0, for the worker keeping the device's copy.
A full inbox drops a U (the device retransmits; counted), fails a C or an S (not
PUBACKed: the broker sends it again) and answers a P with 5.03 and Max-Age.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable

from gateway.errors import UplinkRejected
from gateway.ingest.coap import numbers as C
from gateway.ingest.coap import wire
from gateway.ingest.coap.server import Address, UplinkSink, request_path, uplink_device_id
from gateway.model import Uplink, Verdict
from gateway.runtime.metrics import Metrics
from gateway.runtime.workers import owner

log = logging.getLogger(__name__)

CommandHandler = Callable[[str, str, bytes, bool], Awaitable[None]]  # ..., announce
StateHandler = Callable[[str, bytes], None]  # device id, the state message
Reply = Callable[[Verdict], None]
COMMAND_TIMEOUT_S = 10.0
PATIENCE_S = 5.0  # a command or its answer waits this long for room in a full inbox
INBOX_BUFFER_BYTES = 4 << 20
_U, _C, _A, _P, _V, _S = b"U", b"C", b"A", b"P", b"V", b"S"
_ADDR = struct.Struct("!HB")  # port, host length; the host follows
_COMMAND = struct.Struct("!IBB?")  # request id, type length, id length, announce
_STATE = struct.Struct("!B")  # device id length; the id, then the state message follow
_ANSWER = struct.Struct("!I?")  # request id, stored
_UPLINK = struct.Struct("!IBI")  # request id, sending worker, header length; header, payload
_VERDICT = struct.Struct("!IHii?")  # request id, code, content format, max age, authenticated
_NONE = -1  # content format / max age absent
VERDICT_TIMEOUT_S = 10.0


class SiblingError(Exception):
    """A command could not be handed to the worker owning its device."""


class Siblings:
    def __init__(self, index: int, inbox: socket.socket, outboxes: list[socket.socket],
                 metrics: Metrics) -> None:
        self.index = index
        self.workers = len(outboxes)
        self._inbox = inbox
        self._outboxes = outboxes
        self._metrics = metrics
        self._loop = asyncio.get_running_loop()
        self._on_datagram: Callable[[bytes, Address], None] | None = None
        self._on_command: CommandHandler | None = None
        self._on_state: StateHandler | None = None
        self._request_ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[bool]] = {}
        self._verdicts: dict[int, Reply] = {}  # P sent, V awaited
        self._sink: UplinkSink | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        for sock in (inbox, *outboxes):
            sock.setblocking(False)
        # What a connected AF_UNIX datagram socket may hold in flight is its sender's
        # buffer (~200 KB by default, ~270 datagrams): room for a storm, as the UDP socket.
        for sock in outboxes:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, INBOX_BUFFER_BYTES)

    def start(self, on_datagram: Callable[[bytes, Address], None],
              on_command: CommandHandler, sink: UplinkSink,
              on_state: StateHandler | None = None) -> None:
        self._on_datagram = on_datagram
        self._on_command = on_command
        self._on_state = on_state
        self._sink = sink
        self._loop.add_reader(self._inbox.fileno(), self._drain)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._inbox.fileno())
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(SiblingError("worker stopping"))
        self._verdicts.clear()  # their devices retry (DTLS is closing too)
        for sock in (self._inbox, *self._outboxes):
            sock.close()

    def owns(self, device_id: str) -> bool:
        return owner(device_id, self.workers) == self.index

    # -- uplinks: the CoAP server's router ---------------------------------------------
    def route(self, msg: wire.Message, data: bytes, addr: Address) -> bool:
        device_id = uplink_device_id(request_path(msg))
        if not device_id:
            return False
        target = owner(device_id, self.workers)
        if target == self.index:
            return False
        host = str(addr[0]).encode()
        if self._send(target, b"".join((_U, _ADDR.pack(addr[1], len(host)), host, data))):
            self._metrics.worker_forwarded.inc()
        else:
            self._metrics.worker_forward_dropped.inc()
        return True

    # -- commands: worker 0's MQTT subscription ----------------------------------------
    async def forward_command(self, device_type: str, device_id: str, payload: bytes,
                              announce: bool = True) -> None:
        """Hand a command to the worker owning its device; return once it is stored there.
        `announce`: that worker says `queued` (a cluster's second keeper does not)."""
        target = owner(device_id, self.workers)
        request_id = next(self._request_ids) & 0xFFFF_FFFF
        kind, ident = device_type.encode(), device_id.encode()
        answer = self._loop.create_future()
        self._waiting[request_id] = answer
        try:
            if not await self._send_patiently(target, b"".join((
                    _C, _COMMAND.pack(request_id, len(kind), len(ident), announce), kind,
                    ident,
                    payload))):
                raise SiblingError(f"worker {target}'s inbox stayed full")
            try:
                stored = await asyncio.wait_for(answer, COMMAND_TIMEOUT_S)
            except TimeoutError:
                raise SiblingError(f"worker {target} did not answer in "
                                   f"{COMMAND_TIMEOUT_S:.0f}s") from None
            if not stored:
                raise SiblingError(f"worker {target} could not store the command")
        finally:
            self._waiting.pop(request_id, None)

    async def forward_state(self, device_id: str, state_message: bytes) -> None:
        """Hand another host's command state to the worker owning its device; return once
        it is in that worker's inbox (it acts on it in memory: nothing to wait for)."""
        target = owner(device_id, self.workers)
        ident = device_id.encode()
        if not await self._send_patiently(target, b"".join((
                _S, _STATE.pack(len(ident)), ident, state_message))):
            raise SiblingError(f"worker {target}'s inbox stayed full")

    # -- coaps uplinks: worker 0's DTLS server ----------------------------------------
    def submit_to_owner(self, uplink: Uplink, reply: Reply) -> None:
        """Have the owner's pipeline judge `uplink`; `reply` gets its verdict here (or 5.03
        if the owner cannot be reached or does not answer in VERDICT_TIMEOUT_S)."""
        target = owner(uplink.device_id, self.workers)
        request_id = next(self._request_ids) & 0xFFFF_FFFF
        header = json.dumps([uplink.device_id, uplink.token, uplink.content_format,
                             uplink.transport, uplink.remote, uplink.received_at,
                             uplink.received_mono, uplink.peer_identity]).encode()
        self._verdicts[request_id] = reply
        if not self._send(target, b"".join((_P, _UPLINK.pack(request_id, self.index,
                                                             len(header)), header,
                                            uplink.payload))):
            self._give_up(request_id, f"worker {target}'s inbox is full")
            return
        self._loop.call_later(VERDICT_TIMEOUT_S, self._give_up, request_id,
                              f"worker {target} did not answer in {VERDICT_TIMEOUT_S:.0f}s")

    def _give_up(self, request_id: int, why: str) -> None:
        reply = self._verdicts.pop(request_id, None)
        if reply is not None:
            log.warning("coaps uplink answered 5.03: %s", why)
            reply(Verdict(C.SERVICE_UNAVAILABLE, b"busy, retry later", C.CONTENT_FORMAT_TEXT,
                          max_age_s=5, authenticated=True))

    # -- the inbox ---------------------------------------------------------------------
    async def _send_patiently(self, target: int, message: bytes) -> bool:
        """`_send`, retried while the inbox is full (a storm of forwarded uplinks), for up
        to PATIENCE_S: a command and its answer must not be lost to a passing burst."""
        deadline = self._loop.time() + PATIENCE_S
        while not self._send(target, message):
            if self._loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def _send(self, target: int, message: bytes) -> bool:
        try:
            self._outboxes[target].send(message)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:  # the sibling is gone: the supervisor is stopping us all
            log.debug("cannot reach worker %d: %s", target, e)
            return False
        return True

    def _drain(self) -> None:
        for _ in range(256):  # then let the loop serve the UDP socket too
            try:
                message = self._inbox.recv(1 << 17)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.error("worker inbox failed: %s", e)
                return
            try:
                self._dispatch(message)
            except Exception:  # one bad message must not stop the inbox
                log.exception("cannot handle a message from another worker")

    def _dispatch(self, message: bytes) -> None:
        kind = message[:1]
        if kind == _U:
            port, host_len = _ADDR.unpack_from(message, 1)
            start = 1 + _ADDR.size
            host = message[start:start + host_len].decode()
            assert self._on_datagram is not None
            self._on_datagram(message[start + host_len:], (host, port))
        elif kind == _C:
            request_id, kind_len, ident_len, announce = _COMMAND.unpack_from(message, 1)
            start = 1 + _COMMAND.size
            device_type = message[start:start + kind_len].decode()
            device_id = message[start + kind_len:start + kind_len + ident_len].decode()
            payload = message[start + kind_len + ident_len:]
            task = self._loop.create_task(self._store(request_id, device_type, device_id,
                                                      payload, announce))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif kind == _A:
            request_id, stored = _ANSWER.unpack_from(message, 1)
            fut = self._waiting.get(request_id)
            if fut is not None and not fut.done():
                fut.set_result(stored)
        elif kind == _P:
            self._judge(message)
        elif kind == _S and self._on_state is not None:
            (ident_len,) = _STATE.unpack_from(message, 1)
            start = 1 + _STATE.size
            self._on_state(message[start:start + ident_len].decode(),
                           message[start + ident_len:])
        elif kind == _V:
            request_id, code, content_format, max_age, authenticated = _VERDICT.unpack_from(
                message, 1)
            reply = self._verdicts.pop(request_id, None)
            if reply is not None:
                reply(Verdict(code, message[1 + _VERDICT.size:],
                              None if content_format == _NONE else content_format,
                              None if max_age == _NONE else max_age, authenticated))

    def _judge(self, message: bytes) -> None:
        """A P: run the uplink through our pipeline, send the verdict back as a V."""
        request_id, origin, header_len = _UPLINK.unpack_from(message, 1)
        start = 1 + _UPLINK.size
        fields = json.loads(message[start:start + header_len])
        uplink = Uplink(fields[0], fields[1], fields[2], message[start + header_len:],
                        *fields[3:])

        def reply(verdict: Verdict) -> None:
            if not self._send(origin, b"".join((_V, _VERDICT.pack(
                    request_id, verdict.code,
                    _NONE if verdict.content_format is None else verdict.content_format,
                    _NONE if verdict.max_age_s is None else verdict.max_age_s,
                    verdict.authenticated), verdict.payload))):
                # The uplink's fate stands (spooled or refused); the device gets 5.03 and
                # retries, and a retry of a spooled one is a duplicate, answered 2.04.
                self._metrics.worker_forward_dropped.inc()
                log.warning("verdict %s for coaps uplink of %s not passed back to worker %d",
                            C.code_str(verdict.code), uplink.device_id, origin)

        assert self._sink is not None
        self._sink.submit(uplink, reply)

    async def _store(self, request_id: int, device_type: str, device_id: str,
                     payload: bytes, announce: bool) -> None:
        assert self._on_command is not None
        stored = True
        try:
            await self._on_command(device_type, device_id, payload, announce)
        except Exception:
            log.exception("downlink command for %s from worker 0 could not be stored", device_id)
            stored = False
        if not await self._send_patiently(0, _A + _ANSWER.pack(request_id, stored)):
            log.warning("could not tell worker 0 the command for %s was stored: it is not "
                        "acknowledged to the broker, which sends it again after a reconnect",
                        device_id)


class OwnersSink:
    """The pipeline as worker 0's coaps server sees it: an uplink of a device this worker
    owns goes to its own pipeline, any other to its owner's (gateway.workers > 1)."""

    def __init__(self, pipeline: UplinkSink, siblings: Siblings) -> None:
        self._pipeline = pipeline
        self._siblings = siblings

    def submit(self, uplink: Uplink, reply: Reply) -> None:
        if self._siblings.owns(uplink.device_id):
            self._pipeline.submit(uplink, reply)
        else:
            self._siblings.submit_to_owner(uplink, reply)

    def reject(self, uplink: Uplink, rejection: UplinkRejected, reply: Reply) -> None:
        self._pipeline.reject(uplink, rejection, reply)
