"""Transport-independent uplink handling: authorize, decode, validate, dedup, admit, spool.

Knows nothing of CoAP framing: it takes an Uplink and a reply callback and calls the
callback exactly once with a Verdict. A 2.04 verdict is only ever given once the record
is durable in the spool. Rejections are counted by reason and kept as dead letters.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from collections.abc import Callable

from gateway.coap import numbers as C
from gateway.codecs import DECODERS, DEFAULT_CONTENT_FORMAT, JSON, DecodeError
from gateway.config import Settings
from gateway.downlink import Downlink
from gateway.errors import UplinkRejected
from gateway.liveness import Liveness
from gateway.message import MessageFormat
from gateway.metrics import Metrics
from gateway.model import Record, Uplink, Verdict
from gateway.registry import Device, Registry
from gateway.replay import ReplayWindow, Seen, SeqAccept, SeqState
from gateway.schema import SchemaViolation, TypeSchema, build_schemas
from gateway.spool import Spool, record_size
from gateway.timefmt import rfc3339_ms

log = logging.getLogger(__name__)

Reply = Callable[[Verdict], None]
ACCEPTED = Verdict(C.CHANGED)

DIAGNOSTIC_MAX_BYTES = 96  # a diagnostic must leave room in one NB-IoT datagram


def diagnostic_payload(detail: str) -> bytes:
    """At most DIAGNOSTIC_MAX_BYTES of UTF-8 (RFC 7252 5.5.2), cut between characters."""
    return detail.encode()[:DIAGNOSTIC_MAX_BYTES].decode("utf-8", "ignore").encode()


class RateLimit:
    """A token bucket per key (a device id), two floats in one dict (no object per key)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, at)

    def retry_after_s(self, device_id: str, now: float) -> int | None:
        """None if the key may send now (a token is taken), else seconds to wait."""
        if not self.rate:
            return None
        tokens, at = self._buckets.get(device_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1:
            self._buckets[device_id] = (tokens - 1, now)
            return None
        self._buckets[device_id] = (tokens, now)
        return max(1, math.ceil((1 - tokens) / self.rate))


def message_format(settings: Settings, schemas: dict[str, TypeSchema]) -> MessageFormat:
    return MessageFormat(settings.gateway.tenant, settings.gateway.id,
                         {name: schema.units for name, schema in schemas.items()})


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        spool: Spool,
        metrics: Metrics,
        liveness: Liveness,
        downlink: Downlink,
        every_device: Registry | None = None,
    ) -> None:
        """`every_device`: with workers, the whole registry (`registry` is this worker's
        share); dead letters say whether a device is known at all."""
        self._settings = settings
        self._every_device = every_device or registry
        self._spool = spool
        self._metrics = metrics
        self._registry = registry
        self._liveness = liveness
        self._downlink = downlink
        self._schemas: dict[str, TypeSchema] = build_schemas(settings.types)
        self._format = message_format(settings, self._schemas)
        self._seqs = ReplayWindow(spool.seq_states)
        # (device, seq) being committed now -> its accept and the replies waiting for it
        self._pending: dict[tuple[str, int], tuple[SeqAccept, list[Reply]]] = {}
        spool.on_rollback = self._roll_back_seqs
        limits = settings.limits
        self._rate_limit = RateLimit(limits.per_device_rate, limits.per_device_burst)
        self._in_flight = 0
        self._max_in_flight = limits.max_in_flight
        # One bucket, keyed "": dead letters per second, bursts of 5 s.
        self._dead_letter_budget = RateLimit(limits.dead_letters_per_s,
                                             max(1, round(5 * limits.dead_letters_per_s)))
        self.accepting = True
        # Set while the event loop runs late (a storm): answering 5.03 costs far less than
        # an uplink, and beats the kernel dropping datagrams from a full socket buffer.
        self.overloaded = False
        prefix, tenant = settings.mqtt.topic_prefix, settings.gateway.tenant
        self._topic_base = f"{prefix}/{tenant}"
        self._invalid_topic = f"{prefix}/{tenant}/invalid"
        self._overload_max_age_s = settings.coap.overload_max_age_s
        metrics.registry_devices.set(len(registry))

    def replace_registry(self, registry: Registry, settings: Settings,
                         every_device: Registry | None = None) -> None:
        """Swap in a reloaded registry and types; uplinks in flight keep their verdicts."""
        self._every_device = every_device or registry
        self._schemas = build_schemas(settings.types)
        self._format = message_format(settings, self._schemas)
        self._registry = registry
        self._settings = settings
        self._metrics.registry_devices.set(len(registry))

    # -- the one entry point ---------------------------------------------------------
    def submit(self, uplink: Uplink, reply: Reply) -> None:
        self._metrics.uplinks_received.inc()
        try:
            self._submit(uplink, reply)
        except UplinkRejected as e:
            self._refuse(uplink, e, reply)

    def _submit(self, uplink: Uplink, reply: Reply) -> None:
        if not self.accepting:
            raise UplinkRejected(C.SERVICE_UNAVAILABLE, "shutting_down", "gateway restarting",
                                 max_age_s=self._overload_max_age_s)
        if self.overloaded:
            raise UplinkRejected(C.SERVICE_UNAVAILABLE, "overloaded", "overloaded, retry later",
                                 max_age_s=self._overload_max_age_s)
        device = self._registry.get(uplink.device_id)
        if device is None:
            raise UplinkRejected(C.NOT_FOUND, "unknown_device", "unknown device")
        authenticated = self._authenticate(uplink, device)
        try:
            self._submit_authenticated(uplink, device, reply)
        except UplinkRejected as e:
            e.authenticated = authenticated
            raise

    def _authenticate(self, uplink: Uplink, device: Device) -> bool:
        """Over coaps the DTLS identity is the device; over plain CoAP its `k=` token is.
        True if the device proved who it is, False if coap.require_token let it pass."""
        if uplink.transport == "coaps":
            if uplink.peer_identity is None:
                raise UplinkRejected(C.UNAUTHORIZED, "no_identity",
                                     "DTLS key changed since the handshake; handshake again")
            if uplink.peer_identity != device.device_id:
                raise UplinkRejected(C.FORBIDDEN, "identity_mismatch",
                                     "DTLS identity is another device")
            return True
        if uplink.token is None:
            if self._settings.coap.require_token:
                raise UplinkRejected(C.UNAUTHORIZED, "missing_token", "token k= missing")
            return False
        if not device.token_matches(uplink.token):
            raise UplinkRejected(C.UNAUTHORIZED, "bad_token", "wrong token")
        return True

    def _submit_authenticated(self, uplink: Uplink, device: Device, reply: Reply) -> None:
        if not device.enabled:
            raise UplinkRejected(C.FORBIDDEN, "device_disabled", "device disabled")
        retry_after_s = self._rate_limit.retry_after_s(device.device_id, uplink.received_mono)
        if retry_after_s is not None:
            raise UplinkRejected(C.TOO_MANY_REQUESTS, "rate_limited", "too many uplinks",
                                 max_age_s=retry_after_s)
        content_format = uplink.content_format
        if content_format is None:
            content_format = DEFAULT_CONTENT_FORMAT
        decoder = DECODERS.get(content_format)
        if decoder is None:
            raise UplinkRejected(C.UNSUPPORTED_CONTENT_FORMAT, "unsupported_content_format",
                                 "use content-format 50, 60, 110 or 112")
        try:
            report = self._schemas[device.device_type].validate(decoder(uplink.payload))
        except DecodeError as e:
            raise UplinkRejected(C.BAD_REQUEST, "bad_payload", e.detail) from None
        except SchemaViolation as e:
            raise UplinkRejected(C.BAD_REQUEST, e.reason, e.detail) from None

        seq, seen = report.seq, Seen.NEW
        if seq is not None:
            pending = self._pending.get((device.device_id, seq))
            if pending is not None:  # the same seq is being committed right now
                self._metrics.uplinks_duplicate.inc()
                pending[1].append(reply)
                return
            seen = self._seqs.check(device.device_id, seq, report.device_time)
            if seen is Seen.DUPLICATE:
                self._metrics.uplinks_duplicate.inc()
                self._liveness.seen(device, uplink.received_at)
                reply(self._accepted(device, uplink))
                return
            if seen is Seen.STALE:
                raise UplinkRejected(
                    C.BAD_REQUEST, "stale_seq",
                    f"seq {seq} is far below {self._seqs.hwm(device.device_id)}, the last "
                    "accepted; a restarted counter needs a newer ts")

        record = Record(
            f"{self._topic_base}/{device.device_type}/{device.device_id}/up",
            self._format.encode(device.device_id, device.device_type, report.seq,
                                uplink.received_at, report.device_time, report.values,
                                uplink.transport),
        )
        if not self._spool.has_room(record_size(record)):
            raise UplinkRejected(C.SERVICE_UNAVAILABLE, "spool_full", "spool full, retry later",
                                 max_age_s=self._overload_max_age_s)
        if self._in_flight >= self._max_in_flight:
            raise UplinkRejected(C.SERVICE_UNAVAILABLE, "overloaded", "overloaded, retry later",
                                 max_age_s=self._overload_max_age_s)
        accepted_seq: SeqAccept | None = None
        if seq is not None:
            if seen is Seen.RESET:
                log.info("device %s restarted its seq at %d (device time moved forward)",
                         device.device_id, seq)
            accepted_seq = (device.device_id, seq, report.device_time, seen)
            self._seqs.accept(*accepted_seq)
            self._pending[(device.device_id, seq)] = (accepted_seq, [])
        self._in_flight += 1  # from here on, nothing can raise before on_durable is queued

        def on_durable(ok: bool) -> None:
            if ok and report.ack is not None:
                # The 2.04 waits until the confirmation is durable too: a device that got
                # it never sees the confirmed command ride again after a crash.
                self._downlink.confirm(device.device_id, device.device_type, report.ack,
                                       lambda: answer(True))
            else:
                answer(ok)

        def answer(ok: bool) -> None:
            self._in_flight -= 1
            waiters: list[Reply] = []
            if seq is not None:
                entry = self._pending.pop((device.device_id, seq), None)
                if entry is not None:
                    waiters = entry[1]
            if ok:
                self._liveness.seen(device, uplink.received_at)
                self._metrics.uplinks_accepted.inc()
                self._metrics.uplink_ack_seconds.observe(time.monotonic() - uplink.received_mono)
                verdict = self._accepted(device, uplink)
            else:
                self._metrics.uplinks_rejected.labels("spool_error").inc()
                verdict = Verdict(C.SERVICE_UNAVAILABLE, b"spool write failed",
                                  max_age_s=self._overload_max_age_s)
            reply(verdict)
            for waiter in waiters:
                waiter(verdict)

        self._spool.append(record, on_durable, accepted_seq)

    def _roll_back_seqs(self, before: dict[str, SeqState | None],
                        failed: set[tuple[str, int]]) -> None:
        """A commit failed: its devices' windows go back to what the file holds, then
        every accept still being committed for them is applied again, in order, as the
        spool's writer will apply it. So a retry is judged as it was the first time (a
        restarted counter stays a restart), never against accepts that did not happen."""
        for device_id, state in before.items():
            self._seqs.restore(device_id, state)
        for key, (accepted, _) in self._pending.items():
            if key[0] in before and key not in failed:
                self._seqs.accept(*accepted)

    def _accepted(self, device: Device, uplink: Uplink) -> Verdict:
        """2.04, carrying the device's next downlink command if one waits."""
        command = self._downlink.next_for(device.device_id, device.device_type,
                                          uplink.received_at)
        if command is None:
            return ACCEPTED
        return Verdict(C.CHANGED, command, JSON, authenticated=True)

    # -- rejections ------------------------------------------------------------------
    def reject(self, uplink: Uplink, rejection: UplinkRejected, reply: Reply) -> None:
        """An uplink ingest refused before submitting it (path, method, size, options)."""
        self._metrics.uplinks_received.inc()
        self._refuse(uplink, rejection, reply)

    def _refuse(self, uplink: Uplink, rejection: UplinkRejected, reply: Reply) -> None:
        """Count, keep as a dead letter, and answer with a short diagnostic."""
        self._metrics.uplinks_rejected.labels(rejection.reason).inc()
        if rejection.code not in (C.SERVICE_UNAVAILABLE, C.TOO_MANY_REQUESTS):  # volume, not bad input
            self._keep_dead_letter(uplink, rejection)
        log.debug("rejected uplink from %s device=%s: %s %s", uplink.remote, uplink.device_id,
                  rejection.reason, rejection.detail)
        reply(Verdict(rejection.code, diagnostic_payload(rejection.detail),
                      C.CONTENT_FORMAT_TEXT, rejection.max_age_s, rejection.authenticated))

    def _keep_dead_letter(self, uplink: Uplink, rejection: UplinkRejected) -> None:
        payload = json.dumps({
            "device_id": uplink.device_id or None,
            "device_known": self._every_device.get(uplink.device_id) is not None,
            "reason": rejection.reason,
            "code": C.code_str(rejection.code),
            "detail": rejection.detail,
            "remote": uplink.remote,
            "transport": uplink.transport,
            "received_at": rfc3339_ms(uplink.received_at),
            "content_format": uplink.content_format,
            "payload_b64": base64.b64encode(uplink.payload).decode(),
        }, separators=(",", ":")).encode()
        record = Record(self._invalid_topic, payload)
        # Dead letters may use at most 90% of the spool and a bounded rate, so a flood of
        # garbage can never push valid uplinks into 5.03.
        size = record_size(record) + self._spool.max_bytes // 10
        if (self._spool.has_room(size)
                and self._dead_letter_budget.retry_after_s("", time.monotonic()) is None):
            self._metrics.dead_letters.inc()
            self._spool.append(record, None)
        else:
            self._metrics.dead_letters_dropped.inc()
