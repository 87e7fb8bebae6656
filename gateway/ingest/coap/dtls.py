"""The coaps (CoAP over DTLS, a pre-shared key per device) server side of uplinks.

aiocoap's `tinydtls_server` transport does DTLS and CoAP; this module turns its requests
into `Uplink`s carrying the authenticated PSK identity, and `Verdict`s into responses.
It never starts another aiocoap transport (no TCP, no TLS), and never lets DTLS
sessions pile up: aiocoap alone keeps every session it ever saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import aiocoap
from aiocoap import error as aiocoap_error
from aiocoap.credentials import CredentialsMap
from aiocoap.numbers import COAP_PORT, COAPS_PORT
from aiocoap.numbers.codes import Code
from aiocoap.numbers.constants import TransportTuning
from aiocoap.resource import Resource

from gateway.errors import UplinkRejected
from gateway.ingest.coap import numbers as C
from gateway.ingest.coap.server import LWM2M_ROOTS, Lwm2mSink, UplinkSink
from gateway.model import Uplink, Verdict
from gateway.pipeline.registry import Registry
from gateway.runtime.metrics import Metrics

log = logging.getLogger(__name__)
TRANSPORT = "coaps"
SWEEP_MAX_INTERVAL_S = 10.0
# A commit within it (the shipped linger is 30 ms, the longest allowed 1 s) is piggybacked;
# an empty ACK after it still reaches a device before its ACK_TIMEOUT (2 s) on a round
# trip under 1 s (start()).
EMPTY_ACK_DELAY_S = 1.0


@dataclass(frozen=True, slots=True)
class DtlsClaim:
    """What a DTLS handshake proved: this device, with this key."""

    device_id: str
    psk: bytes = field(repr=False)


class DevicePsks(CredentialsMap):  # type: ignore[misc]  # aiocoap is untyped
    """aiocoap's server credentials, answered from the registry's `psk` column.

    One dict lookup per handshake; aiocoap's own map walks all its entries (40,000 here).
    Reloading swaps the dict: new handshakes use the new keys at once.
    """

    def __init__(self, registry: Registry) -> None:
        super().__init__()
        self._keys: dict[bytes, DtlsClaim] = {}
        self.replace(registry)

    def __bool__(self) -> bool:
        return True  # aiocoap swaps a falsy (here: always empty) map for a new, empty one

    def replace(self, registry: Registry) -> None:
        self._keys = {d.device_id.encode(): DtlsClaim(d.device_id, d.psk)
                      for d in registry if d.psk is not None}

    def __len__(self) -> int:
        return len(self._keys)

    def find_dtls_psk(self, identity: bytes) -> tuple[bytes, DtlsClaim]:
        """Called by aiocoap during a handshake; KeyError makes tinydtls refuse it."""
        claim = self._keys.get(bytes(identity))
        if claim is None:
            raise KeyError(identity)
        return claim.psk, claim

    def identity(self, claim: object) -> str | None:
        """The device a session proved to be, while that device still has that key."""
        if not isinstance(claim, DtlsClaim):
            return None
        current = self._keys.get(claim.device_id.encode())
        return claim.device_id if current == claim else None


class _SessionTable:
    """Bounds aiocoap's DTLS sessions, which it keeps for as long as the process runs.

    A device behind a NAT comes back from a new port, and libcoap's close_notify (a
    warning-level alert) does not end aiocoap's session either: each handshake would cost
    ~4.5 KB for good. Sessions are closed once idle for `idle_s`, and the least recently
    active first once there are `max_sessions`. Reaches into aiocoap 0.4's private pool
    (`_connections`, `_inject_error`), pinned `<0.5` and covered by tests/test_dtls.py.
    """

    def __init__(self, pool: Any, max_sessions: int, idle_s: float) -> None:
        self._connections: OrderedDict[Any, Any] = pool._connections  # LRU first
        self._last_active: OrderedDict[Any, float] = OrderedDict()
        self._max_sessions = max_sessions
        self._idle_s = idle_s
        receive = pool.datagram_received

        def datagram_received(data: bytes, sockaddr: Any) -> None:
            if sockaddr not in self._connections and len(self._connections) >= self._max_sessions:
                self._close(next(iter(self._connections)))
            self._last_active[sockaddr] = time.monotonic()
            self._last_active.move_to_end(sockaddr)
            receive(data, sockaddr)

        pool.datagram_received = datagram_received

    def __len__(self) -> int:
        return len(self._connections)

    def sweep(self, now: float) -> None:
        """Close the sessions idle since before `now - idle_s` (monotonic clock)."""
        cutoff = now - self._idle_s
        while self._last_active:
            sockaddr, at = next(iter(self._last_active.items()))
            if at > cutoff:
                break
            self._close(sockaddr)

    def close_all(self) -> None:
        while self._connections:
            self._close(next(iter(self._connections)))

    def _close(self, sockaddr: Any) -> None:
        self._last_active.pop(sockaddr, None)
        session = self._connections.get(sockaddr)
        if session is None:
            return  # ended by the peer (fatal alert) already
        # Fails what may still wait on this session and removes it from aiocoap's table.
        session._inject_error(aiocoap_error.LibraryShutdown("DTLS session closed: idle"))
        self._connections.pop(sockaddr, None)


class _UplinkResource(Resource):  # type: ignore[misc]  # aiocoap is untyped
    """The whole coaps site: every request goes to the server, whatever its path."""

    def __init__(self, server: DtlsServer) -> None:
        super().__init__()
        self._server = server

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        # Block1 is assembled by aiocoap, but not past the size limit: that block gets 4.13.
        return not self._server.oversized(request)

    async def render(self, request: Any) -> aiocoap.Message:
        return await self._server.handle(request)


class _QuietCloseNotify(logging.Filter):
    """aiocoap warns of every close_notify sent as a warning-level alert (libcoap does):
    one line per uplink. The session table closes those sessions."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unhandled alert level 1 code 0")


class DtlsServer:
    """coaps ingest: `await start(host, port)`, uplinks go to `sink`, `await close()`."""

    def __init__(
        self,
        sink: UplinkSink,
        metrics: Metrics,
        registry: Registry,
        *,
        max_payload_bytes: int,
        max_sessions: int,
        session_idle_s: float,
    ) -> None:
        self._sink = sink
        self._metrics = metrics
        self._psks = DevicePsks(registry)
        self._max_payload = max_payload_bytes
        self._max_sessions = max_sessions
        self._session_idle_s = session_idle_s
        self._context: Any = None
        self._sessions: _SessionTable | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.lwm2m: Lwm2mSink | None = None  # set by the LwM2M server, if enabled

    @property
    def context(self) -> Any:
        """aiocoap's server context (the LwM2M server sends its requests through it)."""
        return self._context

    def allow_requests_to_sessions(self) -> None:
        """Let requests go out on a device's DTLS session (the LwM2M server's commands).
        aiocoap 0.4's DTLS server recognizes only plain-UDP addresses as destinations of
        requests (its own FIXME says this path was never tested), so a request to a
        session's address found no interface. Ours are accepted when the session belongs
        to our socket; covered by tests/test_lwm2m_dtls.py."""
        interface = _dtls_message_interface(self._context)
        recognized = interface.recognize_remote
        pool = interface._pool

        async def recognize_remote(remote: Any) -> bool:
            return bool(await recognized(remote)) or getattr(remote, "_protocol", None) is pool

        interface.recognize_remote = recognize_remote

    @property
    def devices_with_psk(self) -> int:
        return len(self._psks)

    def replace_keys(self, registry: Registry) -> None:
        """SIGHUP: new handshakes use the reloaded keys; a session whose key changed or
        went away gets 4.01 until the device handshakes again."""
        self._psks.replace(registry)

    async def start(self, host: str, port: int) -> None:
        # aiocoap answers a CON request still unanswered after EMPTY_ACK_DELAY (0.1 s) with
        # an empty ACK, and the 2.04 follows as a separate CON that the device must ACK:
        # one more downlink and one more uplink over NB-IoT for each uplink whose commit
        # took longer (a busy or slow disk, a long commit linger). The plain CoAP path
        # always piggybacks. Class-wide: this is the daemon's only aiocoap server (LwM2M
        # over coaps shares its context, and its Sends are piggybacked alike).
        TransportTuning.EMPTY_ACK_DELAY = EMPTY_ACK_DELAY_S
        aiocoap_log = logging.getLogger(f"{__name__}.aiocoap")
        aiocoap_log.addFilter(_QuietCloseNotify())
        aiocoap_log.setLevel(logging.INFO)  # its DEBUG is three lines per request
        try:
            self._context = await aiocoap.Context.create_server_context(
                _UplinkResource(self),
                # aiocoap takes the CoAP port and binds DTLS at that + 1 (5683 -> 5684).
                bind=(host, port - (COAPS_PORT - COAP_PORT)),
                loggername=aiocoap_log.name,
                transports=["tinydtls_server"],  # only DTLS: no TCP or TLS listeners
                server_credentials=self._psks,
            )
        except OSError as e:
            raise OSError(e.errno, f"coaps: cannot bind udp {host} port {port}: "
                                   f"{e.strerror}") from None
        self._sessions = _SessionTable(_dtls_pool(self._context), self._max_sessions,
                                       self._session_idle_s)
        sessions = self._sessions
        self._metrics.dtls_sessions.set_function(lambda: len(sessions))
        self._sweeper = asyncio.create_task(self._sweep_sessions(), name="dtls-sessions")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._sessions is not None:
            # Before aiocoap's shutdown, which otherwise warns once per session left.
            self._sessions.close_all()
        if self._context is not None:
            context, self._context = self._context, None
            await context.shutdown()

    async def _sweep_sessions(self) -> None:
        interval_s = min(SWEEP_MAX_INTERVAL_S, self._session_idle_s / 4)
        while True:
            await asyncio.sleep(interval_s)
            try:
                assert self._sessions is not None
                self._sessions.sweep(time.monotonic())
            except Exception:  # task boundary: keep sweeping, say why it failed
                log.exception("closing idle DTLS sessions failed")

    # -- one request -----------------------------------------------------------------
    async def handle(self, request: Any) -> aiocoap.Message:
        received_at, received_mono = time.time(), time.monotonic()
        path = request.opt.uri_path
        device_id = path[1] if len(path) == 2 and path[0] == "up" else ""
        token = None
        for query in request.opt.uri_query:
            if query.startswith("k="):
                token = query[2:]
        content_format = request.opt.content_format
        claims = request.remote.authenticated_claims
        uplink = Uplink(device_id, token, None if content_format is None else int(content_format),
                        request.payload, TRANSPORT, _remote(request.remote), received_at,
                        received_mono, self._psks.identity(claims[0]) if claims else None)
        verdict: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()

        def reply(answer: Verdict) -> None:
            if not verdict.done():  # done: aiocoap gave up on the request (shutdown)
                verdict.set_result(answer)

        if path and path[0] in LWM2M_ROOTS and self.lwm2m is not None:
            if self.oversized(request):
                self._sink.reject(uplink, self._too_large(), reply)
            else:
                self.lwm2m.request(int(request.code), _sockaddr(request.remote), list(path),
                                   list(request.opt.uri_query), uplink.content_format,
                                   request.payload, uplink, reply, dtls_remote=request.remote)
            return self._response(await verdict)
        rejection = self._refusal(request, device_id)
        if rejection is not None:
            self._sink.reject(uplink, rejection, reply)
        else:
            self._sink.submit(uplink, reply)
        return self._response(await verdict)

    def oversized(self, request: Any) -> bool:
        """Over coap.max_payload_bytes, counting the Block1 blocks before this one."""
        block1 = request.opt.block1
        if block1 is not None and len(request.payload) <= block1.size:  # one block
            size = block1.start + len(request.payload)
        else:  # a whole body, or one assembled from blocks
            size = len(request.payload)
        return size > self._max_payload or (request.opt.size1 or 0) > self._max_payload

    def _refusal(self, request: Any, device_id: str) -> UplinkRejected | None:
        """What ingest refuses before the pipeline sees it, as the UDP server does."""
        if request.opt.proxy_uri is not None or request.opt.proxy_scheme is not None:
            return UplinkRejected(C.PROXYING_NOT_SUPPORTED, "proxying_not_supported", "no proxying")
        if not device_id:
            return UplinkRejected(C.NOT_FOUND, "unknown_path", "POST to /up/{device_id}")
        if request.code not in (Code.POST, Code.PUT):
            return UplinkRejected(C.METHOD_NOT_ALLOWED, "method_not_allowed", "use POST or PUT")
        if self.oversized(request):
            return self._too_large()
        return None

    def _too_large(self) -> UplinkRejected:
        return UplinkRejected(C.REQUEST_ENTITY_TOO_LARGE, "payload_too_large",
                              f"max {self._max_payload} bytes")

    def _response(self, verdict: Verdict) -> aiocoap.Message:
        response = aiocoap.Message(code=Code(verdict.code), payload=verdict.payload)
        if verdict.payload and verdict.content_format is not None:
            response.opt.content_format = verdict.content_format
        if verdict.max_age_s is not None:
            response.opt.max_age = verdict.max_age_s
        if verdict.code == C.REQUEST_ENTITY_TOO_LARGE:
            response.opt.size1 = self._max_payload
        if verdict.location:
            response.opt.location_path = verdict.location
        return response


def _dtls_pool(context: Any) -> Any:
    """aiocoap's table of DTLS sessions (private in aiocoap 0.4; see _SessionTable)."""
    return _dtls_message_interface(context)._pool


def _dtls_message_interface(context: Any) -> Any:
    for token_manager in context.request_interfaces:
        message_interface = getattr(token_manager.token_interface, "message_interface", None)
        pool = getattr(message_interface, "_pool", None)
        if hasattr(pool, "_connections") and hasattr(pool, "datagram_received"):
            return message_interface
    raise RuntimeError(f"aiocoap {aiocoap.meta.version}: its DTLS server has no session table "
                       "where gateway/ingest/coap/dtls.py expects one; DTLS sessions cannot be bounded")


def _sockaddr(remote: Any) -> tuple[str, int]:
    """The device's UDP address under its DTLS session (aiocoap 0.4's private layout)."""
    address = getattr(getattr(remote, "_underlying_address", None), "address", None)
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return _remote(remote), 0


def _remote(remote: Any) -> str:
    """`host:port` of the device, an IPv4 address without its v4-mapped IPv6 prefix."""
    hostinfo = str(remote.hostinfo)
    if hostinfo.startswith("[::ffff:") and "." in hostinfo:
        host, _, port = hostinfo[len("[::ffff:"):].partition("]")
        return host + port
    return hostinfo
