"""The LwM2M server: the registration interface (Register, Update, De-register on `/rd`),
Send (`/dp`) and Observe notifications in, commands out, on the CoAP server's socket.

Readings become plain Uplinks (transport "lwm2m") for the same pipeline as `/up`: the
type's `[types.X.lwm2m] fields` say which resource holds which field; resources no field
maps ride along in the message under "resources". A reading that carries its time
(SenML `bt`+`t`) has that time in ms as its `seq`, so the replay window catches a
retransmission that comes through a new NAT port, and readings must come in time order
(64 ms of slack; an older one is refused as stale_seq). A reading without a time (text,
TLV, a SenML record without `t`) has no `seq`: CoAP's own deduplication (same endpoint
and message ID) is all it gets, so a retransmission of it through a new NAT port would
be forwarded twice. Registration rejections go through the pipeline's `reject`
(counted, dead-lettered) like any refused uplink.

Commands wait in the downlink store (durable) and go out as CON requests, one at a time
per device (RFC 7252 NSTART = 1), when the device is reachable: at once in binding U,
else within `lwm2m.awake_s` after it last spoke (Register, Update, Send, a notification).
The device's answer confirms the command with a result; no answer leaves it queued for
the device's next contact, until its ttl ends it as `expired`.
It never raises into the CoAP server, and it never answers a Register before the
registration is on disk.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from gateway.config import Settings
from gateway.errors import UplinkRejected
from gateway.ingest.coap import numbers as C
from gateway.ingest.coap import wire
from gateway.ingest.coap.server import Address, CoapServer, UplinkSink, format_address
from gateway.ingest.lwm2m import commands, content
from gateway.ingest.lwm2m.links import LinkError, parse_object_links
from gateway.ingest.lwm2m.over_dtls import DtlsRequester
from gateway.ingest.lwm2m.paths import LwM2mPath, parse_path, render_path
from gateway.ingest.lwm2m.requests import Notify, Requester
from gateway.model import Uplink, Verdict
from gateway.pipeline.registry import Device, Registry
from gateway.runtime.metrics import Metrics
from gateway.store.downlink import Downlink
from gateway.store.liveness import Liveness
from gateway.store.registrations import Registration, Registrations

if TYPE_CHECKING:
    from gateway.ingest.coap.dtls import DtlsServer

log = logging.getLogger(__name__)

TRANSPORT, TRANSPORT_DTLS = "lwm2m", "lwm2m+coaps"  # Uplink.transport, in the message
VERSIONS = ("1.0", "1.1", "1.2")
SEND_FORMATS = (content.SENML_JSON, content.SENML_CBOR, content.LWM2M_CBOR)
BINDING_CHARS = frozenset("UQSNT")
Reply = Callable[[Verdict], None]


class Lwm2mServer:
    def __init__(self, settings: Settings, registry: Registry, sink: UplinkSink,
                 registrations: Registrations, downlink: Downlink, liveness: Liveness,
                 metrics: Metrics) -> None:
        self._settings = settings
        self._registry = registry
        self._sink = sink
        self._registrations = registrations
        self._downlink = downlink
        self._liveness = liveness
        self._metrics = metrics
        self._requester: Requester | None = None
        self._dtls: DtlsRequester | None = None
        self._remotes: dict[str, object] = {}  # device -> its DTLS session's address
        self._maps = _field_maps(settings)
        self._busy: set[str] = set()  # devices with a request of ours in flight
        self._awake_until: dict[str, float] = {}  # monotonic
        self._to_observe: dict[str, list[str]] = {}  # after a Register, before commands
        metrics.lwm2m_registrations.set_function(lambda: len(registrations))

    def attach(self, coap: CoapServer) -> None:
        """Speak through `coap`'s socket: requests leave from the address devices know."""
        self._requester = Requester(coap.send, coap.next_mid)
        coap.lwm2m = self
        for registration in self._registrations:
            for token, path in registration.observations.items():
                self._requester.observe(bytes.fromhex(token),
                                        self._notifier(registration.device_id, path))

    def attach_dtls(self, dtls: DtlsServer) -> None:
        """Also serve LwM2M over coaps: a device's PSK identity is its endpoint name."""
        assert dtls.context is not None
        dtls.allow_requests_to_sessions()
        self._dtls = DtlsRequester(dtls.context)
        dtls.lwm2m = self

    async def close(self) -> None:
        if self._dtls is not None:
            await self._dtls.close()

    def replace_registry(self, registry: Registry, settings: Settings) -> None:
        self._registry, self._settings = registry, settings
        self._maps = _field_maps(settings)

    # -- requests from devices (the CoAP server's Lwm2mSink) -------------------------------
    def request(self, code: int, addr: Address, path: list[str], query: list[str],
                content_format: int | None, payload: bytes, uplink: Uplink, reply: Reply,
                dtls_remote: object | None = None) -> None:
        # The device it is about, as far as the request says, for the dead letters.
        params = _params(query)
        named = (params.get("ep", "") if path == ["rd"]
                 else path[1] if len(path) == 2 and path[0] == "rd" else "")
        secure = dtls_remote is not None
        uplink = dataclasses.replace(uplink, transport=TRANSPORT_DTLS if secure else TRANSPORT,
                                     device_id=named)
        try:
            if secure and uplink.peer_identity is not None:
                self._remotes[uplink.peer_identity] = dtls_remote
            if path == ["rd"] and code == C.POST:
                self._register(params, payload, addr, uplink, reply)
            elif len(path) == 2 and path[0] == "rd" and code in (C.POST, C.DELETE):
                self._update(path[1], code == C.DELETE, params, payload, addr, uplink, reply)
            elif path == ["dp"] and code == C.POST:
                self._send(content_format, payload, addr, uplink, reply)
            elif (path[0] == "rd" and len(path) <= 2) or path == ["dp"]:
                raise UplinkRejected(C.METHOD_NOT_ALLOWED, "method_not_allowed",
                                     "Register: POST /rd; Update: POST /rd/{id}; De-register: "
                                     "DELETE /rd/{id}; Send: POST /dp")
            else:
                raise UplinkRejected(C.NOT_FOUND, "unknown_path", "LwM2M: /rd, /rd/{id}, /dp")
        except UplinkRejected as rejection:
            self._sink.reject(uplink, rejection, reply)

    def _register(self, params: dict[str, str], payload: bytes, addr: Address, uplink: Uplink,
                  reply: Reply) -> None:
        endpoint = params.get("ep")
        if not endpoint:
            raise self._refused("register", C.BAD_REQUEST, "bad_registration",
                                "Register needs ?ep={device_id}")
        device = self._allowed(endpoint, "register", uplink)
        version = params.get("lwm2m") or "1.0"
        if version not in VERSIONS:
            raise self._refused("register", C.PRECONDITION_FAILED, "unsupported_version",
                                f"LwM2M version {version[:8]} not supported "
                                f"({', '.join(VERSIONS)})")
        lifetime = self._lifetime(params.get("lt") or "86400", "register")
        binding = self._binding(params.get("b") or "U", "Q" in params, "register")
        if not payload:
            raise self._refused("register", C.BAD_REQUEST, "bad_object_list",
                                "Register needs its object links, e.g. </3303/0>")
        self._object_links(payload, "register")
        now = time.time()
        old = self._registrations.get(endpoint)
        if old is not None:
            self._forget_observations(old)
        registration = Registration(endpoint, lifetime, binding, version, payload.decode(),
                                    str(addr[0]), int(addr[1]), _over(uplink), now, now)
        # A 1.0 device cannot Send: what it reports comes by Observe. A 1.1 device Sends.
        self._to_observe[endpoint] = list(self._observe_paths(device)) if version == "1.0" else []

        def stored(ok: bool) -> None:
            if not ok:
                self._unstored("register", uplink, reply)
                return
            self._metrics.lwm2m_registration_ops.labels("register", "ok").inc()
            log.info("lwm2m: %s registered from %s (lifetime %ds, binding %s, LwM2M %s)",
                     endpoint, uplink.remote, lifetime, binding, version)
            reply(Verdict(C.CREATED, location=("rd", endpoint), authenticated=True))
            self._liveness.seen(device, now)
            self._contact(endpoint)

        self._registrations.put(registration, stored)

    def _update(self, location: str, deregister: bool, params: dict[str, str], payload: bytes,
                addr: Address, uplink: Uplink, reply: Reply) -> None:
        op = "deregister" if deregister else "update"
        old = self._registrations.get(location)
        if old is None:
            raise self._refused(op, C.NOT_FOUND, "not_registered",
                                f"no registration /rd/{location[:40]}: Register again")
        device = self._allowed(location, op, uplink)
        if deregister:
            self._forget_observations(old)

            def removed(ok: bool) -> None:
                if not ok:
                    self._unstored(op, uplink, reply)
                    return
                self._metrics.lwm2m_registration_ops.labels(op, "ok").inc()
                log.info("lwm2m: %s de-registered", location)
                reply(Verdict(C.DELETED, authenticated=True))
                self._liveness.went_away(device, "de-registered (LwM2M De-register)")

            self._registrations.remove(location, removed)
            return
        lifetime = self._lifetime(params["lt"], op) if params.get("lt") else old.lifetime_s
        binding = (self._binding(params["b"], "Q" in params, op) if params.get("b")
                   else old.binding + ("Q" if "Q" in params and "Q" not in old.binding else ""))
        if payload:
            self._object_links(payload, op)
        now = time.time()
        registration = dataclasses.replace(
            old, lifetime_s=lifetime, binding=binding, host=str(addr[0]), port=int(addr[1]),
            objects=payload.decode() if payload else old.objects, updated_at=now,
            transport=_over(uplink))

        def stored(ok: bool) -> None:
            if not ok:
                self._unstored(op, uplink, reply)
                return
            self._metrics.lwm2m_registration_ops.labels(op, "ok").inc()
            reply(Verdict(C.CHANGED, authenticated=True))
            self._liveness.seen(device, now)
            self._contact(location)

        self._registrations.put(registration, stored)

    def _send(self, content_format: int | None, payload: bytes, addr: Address, uplink: Uplink,
              reply: Reply) -> None:
        if uplink.transport == TRANSPORT_DTLS:  # the DTLS identity names the device
            registration = (self._registrations.get(uplink.peer_identity)
                            if uplink.peer_identity else None)
        else:  # a Send names no device: its address does
            registration = self._registrations.at((str(addr[0]), int(addr[1])))
        if registration is None:
            raise UplinkRejected(C.FORBIDDEN, "not_registered",
                                 "no registration from this address: Register or Update first")
        uplink = dataclasses.replace(uplink, device_id=registration.device_id,
                                     peer_identity=registration.device_id)
        try:
            if content_format not in SEND_FORMATS:
                raise UplinkRejected(C.UNSUPPORTED_CONTENT_FORMAT, "unsupported_content_format",
                                     "Send: content-format 110, 112 or 11544")
            try:
                readings = content.decode(payload, content_format, (), uplink.received_at)
            except content.ContentError as e:
                raise UplinkRejected(C.BAD_REQUEST, "bad_payload", e.detail) from None
            self._submit(registration.device_id, readings, uplink, reply)
        except UplinkRejected as rejection:
            self._sink.reject(uplink, rejection, reply)
        self._contact(registration.device_id)

    def response(self, msg: wire.Message, addr: Address) -> bool:
        return self._requester is not None and self._requester.received(msg, addr)

    # -- the device's readings into the pipeline ------------------------------------------
    def _submit(self, device_id: str, readings: list[content.Reading], uplink: Uplink,
                reply: Reply) -> None:
        """One uplink per distinct reading time; `reply` once, with the worst verdict."""
        if not readings:
            raise UplinkRejected(C.BAD_REQUEST, "bad_payload", "no readings")
        device = self._registry.get(device_id)
        by_time: dict[float | None, list[content.Reading]] = {}
        for reading in readings:
            by_time.setdefault(reading.time, []).append(reading)
        field_of = self._maps.get(device.device_type, {}) if device else {}
        uplinks = []
        for at, group in sorted(by_time.items(), key=lambda kv: kv[0] or 0.0):
            fields: dict[str, object] = {}
            resources: dict[str, object] = {}
            for reading in group:
                name = field_of.get(reading.path)
                if name is None:
                    value = commands.jsonable(reading.value)
                    resources[render_path(reading.path)] = value.get("value", value)
                    continue
                try:
                    fields[name] = content.as_kind(reading.value, "float")
                except content.ContentError as e:
                    raise UplinkRejected(C.BAD_REQUEST, "bad_payload",
                                         f"{render_path(reading.path)}: {e.detail}") from None
            self._metrics.lwm2m_unmapped_resources.inc(len(resources))
            if at is not None:  # no time, no seq: see the module's docstring
                fields["seq"], fields["ts"] = round(at * 1000), at
            uplinks.append(dataclasses.replace(uplink, fields=fields, resources=resources or None))
        joint = _Joint(len(uplinks), reply)
        for one in uplinks:
            self._sink.submit(one, joint.reply)

    def _notifier(self, device_id: str, path_text: str
                  ) -> Callable[[wire.Message, Address, Callable[[], None]], None]:
        path = parse_path(path_text)

        def notified(msg: wire.Message, addr: Address, ack: Callable[[], None]) -> None:
            registration = self._registrations.get(device_id)
            if registration is None or msg.code >> 5 != 2:
                ack()  # the observation ended (an error code), or the device left
                if registration is not None:
                    self._drop_observation(registration, msg.token)
                return
            if (registration.transport == "coap"
                    and (str(addr[0]), int(addr[1])) != registration.endpoint):  # NAT moved it
                self._registrations.put(dataclasses.replace(
                    registration, host=str(addr[0]), port=int(addr[1])))
            self._notified(registration, path, msg, addr, ack)

        return notified

    def _notified(self, registration: Registration, path: LwM2mPath, msg: wire.Message,
                  addr: Address, ack: Callable[[], None]) -> None:
        cf_option = msg.option(C.CONTENT_FORMAT)
        cf = wire.uint_of(cf_option) if cf_option is not None else content.TEXT
        now = time.time()
        device_id = registration.device_id
        transport = TRANSPORT_DTLS if registration.transport == "coaps" else TRANSPORT
        uplink = Uplink(device_id, None, cf, msg.payload, transport, format_address(addr), now,
                        time.monotonic(), peer_identity=device_id, partial=True)

        def answered(verdict: Verdict) -> None:
            if verdict.code < C.SERVICE_UNAVAILABLE:  # durable, or refused and kept
                ack()

        try:
            readings = content.decode(msg.payload, cf, path, now)
            self._submit(device_id, readings, uplink, answered)
        except UplinkRejected as rejection:
            self._sink.reject(uplink, rejection, answered)
        except content.ContentError as e:
            self._sink.reject(uplink, UplinkRejected(C.BAD_REQUEST, "bad_payload", e.detail),
                              answered)
        self._contact(device_id)

    # -- requests to devices ---------------------------------------------------------------
    def command_arrived(self, device_id: str) -> None:
        """A command was stored for `device_id`: send it now if the device can hear it."""
        if self._registrations.get(device_id) is not None:
            self._flush(device_id)

    def _contact(self, device_id: str) -> None:
        """The device just spoke: it listens for `awake_s` (queue mode)."""
        self._awake_until[device_id] = time.monotonic() + self._settings.lwm2m.awake_s
        self._flush(device_id)

    def _flush(self, device_id: str) -> None:
        """Send the device's next request (an observation to set up, then a command),
        unless one is in flight or the device sleeps."""
        registration = self._registrations.get(device_id)
        device = self._registry.get(device_id)
        if (device_id in self._busy or registration is None or device is None
                or self._requester is None):
            return
        if registration.queue_mode and time.monotonic() > self._awake_until.get(device_id, 0.0):
            return
        to_observe = self._to_observe.get(device_id)
        if to_observe:
            self._observe(registration, to_observe.pop(0))
            return
        command = self._downlink.take_next(device_id, device.device_type, time.time())
        if command is None:
            return
        if "op" not in command.body:
            self._downlink.confirm(device_id, device.device_type, command.command_id,
                                   lambda: self._flush(device_id),
                                   {"error": "not an LwM2M command (no \"op\"): this device "
                                             "speaks LwM2M"})
            return
        try:
            request = commands.build(command.body, registration.version)
        except commands.BadCommand as e:
            self._downlink.confirm(device_id, device.device_type, command.command_id,
                                   lambda: self._flush(device_id), {"error": str(e)})
            return

        def done(response: wire.Message | None) -> None:
            self._busy.discard(device_id)
            self._metrics.lwm2m_requests.labels(
                request.op, "unanswered" if response is None else "answered").inc()
            if response is None:
                log.info("lwm2m: %s did not answer %s %s (command %s); tried again when it "
                         "next speaks", device_id, request.op, render_path(request.path),
                         command.command_id)
                return
            now = time.time()
            if request.op == "observe" and _observing(response):
                self._keep_observation(device_id, response.token, render_path(request.path))
            elif request.op == "cancel-observe":
                self._drop_observations_of(device_id, render_path(request.path))
            self._downlink.confirm(device_id, device.device_type, command.command_id,
                                   lambda: self._flush(device_id),
                                   commands.result(request, response, now))

        on_notify = (self._notifier(device_id, render_path(request.path))
                     if request.op == "observe" else None)
        self._send_request(registration, request.code, request.options, request.payload, done,
                           on_notify)

    def _observe(self, registration: Registration, path_text: str) -> None:
        assert self._requester is not None
        device_id = registration.device_id
        path = parse_path(path_text)
        options = [(C.OBSERVE, b""), *((C.URI_PATH, str(p).encode()) for p in path)]

        def done(response: wire.Message | None) -> None:
            self._busy.discard(device_id)
            self._metrics.lwm2m_requests.labels(
                "observe", "unanswered" if response is None else "answered").inc()
            if response is not None and _observing(response):
                self._keep_observation(device_id, response.token, path_text)
            elif response is not None:
                log.info("lwm2m: %s did not take the observation of %s: %s%s", device_id,
                         path_text, C.code_str(response.code),
                         "" if response.code >> 5 != 2 else " without Observe")
            self._flush(device_id)

        self._send_request(registration, C.GET, options, b"", done,
                           self._notifier(device_id, path_text))

    def _send_request(self, registration: Registration, code: int,
                      options: list[tuple[int, bytes]], payload: bytes,
                      done: Callable[[wire.Message | None], None],
                      on_notify: Notify | None) -> None:
        """Over the transport the device registered with; one at a time per device."""
        assert self._requester is not None
        self._busy.add(registration.device_id)
        if registration.transport == "coap":
            self._requester.request(registration.endpoint, code, options, payload, done,
                                    on_notify=on_notify)
            return
        remote = self._remotes.get(registration.device_id)
        if self._dtls is None or remote is None:  # no session since a restart: it speaks first
            done(None)
            return
        self._dtls.request(remote, code, options, payload, done, on_notify=on_notify)

    def _keep_observation(self, device_id: str, token: bytes, path: str) -> None:
        registration = self._registrations.get(device_id)
        # Over coaps aiocoap holds the observation, and it ends with the DTLS session.
        if registration is not None and registration.transport == "coap":
            observations = {t: p for t, p in registration.observations.items() if p != path}
            observations[token.hex()] = path
            self._registrations.put(dataclasses.replace(registration, observations=observations))

    def _drop_observation(self, registration: Registration, token: bytes) -> None:
        if token.hex() in registration.observations:
            observations = dict(registration.observations)
            del observations[token.hex()]
            self._registrations.put(dataclasses.replace(registration, observations=observations))

    def _drop_observations_of(self, device_id: str, path: str) -> None:
        registration = self._registrations.get(device_id)
        if registration is None:
            return
        for token, observed in registration.observations.items():
            if observed == path and self._requester is not None:
                self._requester.forget(bytes.fromhex(token))
        self._registrations.put(dataclasses.replace(registration, observations={
            t: p for t, p in registration.observations.items() if p != path}))

    def _forget_observations(self, registration: Registration) -> None:
        for token in registration.observations:
            if self._requester is not None:
                self._requester.forget(bytes.fromhex(token))

    # -- housekeeping --------------------------------------------------------------------
    def sweep(self, now: float) -> None:
        """Registrations whose lifetime ran out end; their devices go offline."""
        for registration in self._registrations.expired(now):
            self._forget_observations(registration)
            self._registrations.remove(registration.device_id)
            self._metrics.lwm2m_lifetime_expired.inc()
            self._awake_until.pop(registration.device_id, None)
            device = self._registry.get(registration.device_id)
            log.info("lwm2m: registration of %s ended: no Update within its lifetime of %ds",
                     registration.device_id, registration.lifetime_s)
            if device is not None:
                self._liveness.went_away(
                    device, f"LwM2M registration lifetime ({registration.lifetime_s}s) ran out "
                            "without an Update")

    # -- checks ----------------------------------------------------------------------------
    def _allowed(self, device_id: str, op: str, uplink: Uplink) -> Device:
        device = self._registry.get(device_id)
        if device is None:
            raise self._refused(op, C.FORBIDDEN, "unknown_device", "unknown endpoint")
        if uplink.transport == TRANSPORT_DTLS:  # the PSK identity is the endpoint name
            if uplink.peer_identity != device_id:
                raise self._refused(op, C.FORBIDDEN, "identity_mismatch",
                                    "DTLS identity is another endpoint")
        elif not self._settings.lwm2m.allow_nosec:
            raise self._refused(op, C.FORBIDDEN, "nosec_not_allowed",
                                "plain-UDP (NoSec) registration is off: lwm2m.allow_nosec")
        if not device.enabled:
            raise self._refused(op, C.FORBIDDEN, "device_disabled", "device disabled")
        return device

    def _lifetime(self, text: str, op: str) -> int:
        s = self._settings.lwm2m
        if not text.isdigit() or not s.min_lifetime_s <= int(text) <= s.max_lifetime_s:
            raise self._refused(op, C.BAD_REQUEST, "bad_lifetime",
                                f"lt must be {s.min_lifetime_s}..{s.max_lifetime_s} seconds")
        return int(text)

    def _binding(self, binding: str, queue_param: bool, op: str) -> str:
        if not binding or not set(binding) <= BINDING_CHARS or "U" not in binding:
            raise self._refused(op, C.BAD_REQUEST, "bad_binding",
                                "binding b= must include U (UDP), e.g. U or UQ")
        return binding + "Q" if queue_param and "Q" not in binding else binding

    def _object_links(self, payload: bytes, op: str) -> None:
        try:
            parse_object_links(payload)
        except LinkError as e:
            raise self._refused(op, C.BAD_REQUEST, "bad_object_list",
                                f"object links: {e.detail}") from None

    def _refused(self, op: str, code: int, reason: str, detail: str) -> UplinkRejected:
        self._metrics.lwm2m_registration_ops.labels(op, reason).inc()
        return UplinkRejected(code, reason, detail)

    def _unstored(self, op: str, uplink: Uplink, reply: Reply) -> None:
        self._sink.reject(uplink, self._refused(
            op, C.SERVICE_UNAVAILABLE, "registration_not_stored",
            "registration not stored, retry later"), reply)

    def _observe_paths(self, device: Device) -> tuple[str, ...]:
        spec = self._settings.types.get(device.device_type)
        return spec.lwm2m.observe if spec is not None and spec.lwm2m is not None else ()


class _Joint:
    """One reply for several uplinks: the worst verdict (5.xx, then 4.xx, else the first)."""

    def __init__(self, expected: int, reply: Reply) -> None:
        self._expected, self._reply = expected, reply
        self._verdicts: list[Verdict] = []

    def reply(self, verdict: Verdict) -> None:
        self._verdicts.append(verdict)
        if len(self._verdicts) == self._expected:
            self._reply(max(self._verdicts, key=lambda v: (v.code >> 5 != 2, v.code)))


def _observing(response: wire.Message) -> bool:
    """A 2.xx with an Observe option: the device took the observation (RFC 7641 3.1; a
    2.05 without it is only the current value)."""
    return response.code >> 5 == 2 and response.option(C.OBSERVE) is not None


def _over(uplink: Uplink) -> str:
    return "coaps" if uplink.transport == TRANSPORT_DTLS else "coap"


def _params(query: list[str]) -> dict[str, str]:
    """`ep=x`, `lt=300`, `Q` (no value) -> {"ep": "x", "lt": "300", "Q": ""}."""
    params: dict[str, str] = {}
    for item in query:
        name, _, value = item.partition("=")
        params[name] = value
    return params


def _field_maps(settings: Settings) -> dict[str, Mapping[LwM2mPath, str]]:
    """device type -> resource path -> field"""
    return {name: {parse_path(path): field for field, path in spec.lwm2m.fields.items()}
            for name, spec in settings.types.items() if spec.lwm2m is not None}

