"""Transport-independent uplink handling: authorize, decode, validate, dedup, admit, spool.

Knows nothing of CoAP framing: it takes an Uplink and a reply callback and calls the
callback exactly once with a Verdict. A 2.04 verdict is only ever given once the record
is durable in the spool. Rejections are counted by reason and kept as dead letters.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections.abc import Callable

from gateway.config import Settings
from gateway.errors import UplinkRejected
from gateway.ingest.coap import numbers as C
from gateway.model import Record, Uplink, Verdict
from gateway.pipeline.codecs import DECODERS, DEFAULT_CONTENT_FORMAT, JSON, Decoded, DecodeError
from gateway.pipeline.message import MessageFormat
from gateway.pipeline.registry import Device, Registry
from gateway.pipeline.replay import (
    NotedReplayWindow,
    ReplayWindow,
    Seen,
    SeqAccept,
    SeqState,
    merge_foreign,
)
from gateway.pipeline.schema import SchemaViolation, TypeSchema, build_schemas
from gateway.runtime.metrics import Metrics
from gateway.store.downlink import Downlink
from gateway.store.liveness import Liveness
from gateway.store.spool import Spool, record_size
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
        # cluster.ack = "broker": a 2.04 waits for the broker's PUBACK, not only the disk.
        self._broker_ack = settings.cluster.enabled and settings.cluster.ack == "broker"
        self._broker_ack_timeout_s = settings.cluster.broker_ack_timeout_s
        self.broker_connected: Callable[[], bool] = lambda: True  # the service sets it
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

    # -- a cluster: seqs across hosts -------------------------------------------------
    def note_accepts(self, note: Callable[[str, int, Seen], None]) -> None:
        """Tell `note` of every seq accepted from now on (a cluster host's holdings)."""
        self._seqs = NotedReplayWindow(self._seqs, note)

    def merge_accepts(self, device_id: str, seqs: list[int], other_host: str,
                      this_host: str) -> list[int]:
        """`other_host` accepted `seqs` of `device_id` while it held the device: refuse
        them here from now on, and report those this host accepted too (each is on MQTT
        twice): counted, logged, and published on `.../{device}/duplicates`."""
        device = self._registry.get(device_id)
        if device is None:
            return []
        duplicates = merge_foreign(self._seqs, self._pending, device_id, seqs)
        if not duplicates:
            return duplicates
        self._metrics.cluster_duplicates.inc(len(duplicates))
        log.warning("cluster: device %s seq %s accepted by both %s and %s (this host): on "
                    "MQTT twice; consumers drop the second by (device_id, seq)", device_id,
                    ",".join(map(str, duplicates)), other_host, this_host)
        record = Record(
            f"{self._topic_base}/{device.device_type}/{device_id}/duplicates",
            json.dumps({"device_id": device_id, "seqs": duplicates,
                        "accepted_by": [other_host, this_host],
                        "found_at": rfc3339_ms(time.time())},
                       separators=(",", ":")).encode())
        if self._spool.has_room(record_size(record)):
            self._spool.append(record, None)
        return duplicates

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

    @staticmethod
    def _decode(uplink: Uplink) -> Decoded:
        if uplink.fields is not None:  # LwM2M: read from the resources by ingest
            return Decoded(dict(uplink.fields))
        content_format = uplink.content_format
        if content_format is None:
            content_format = DEFAULT_CONTENT_FORMAT
        decoder = DECODERS.get(content_format)
        if decoder is None:
            raise UplinkRejected(C.UNSUPPORTED_CONTENT_FORMAT, "unsupported_content_format",
                                 "use content-format 50, 60, 110 or 112")
        return decoder(uplink.payload)

    def _authenticate(self, uplink: Uplink, device: Device) -> bool:
        """Over coaps the DTLS identity is the device; over plain CoAP its `k=` token is.
        True if the device proved who it is, False if coap.require_token let it pass."""
        if uplink.transport.startswith("lwm2m"):
            # The registration interface found the device by its registration (and, over
            # coaps, its DTLS identity); lwm2m.allow_nosec decided whether plain UDP may.
            if uplink.peer_identity != device.device_id:
                raise UplinkRejected(C.FORBIDDEN, "not_registered", "not registered")
            return True
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
        try:
            report = self._schemas[device.device_type].validate(self._decode(uplink),
                                                                 uplink.partial)
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
                if self._broker_ack:
                    asyncio.get_running_loop().call_later(
                        self._broker_ack_timeout_s, self._unconfirmed, pending[1], reply)
                return
            seen = self._seqs.check(device.device_id, seq, report.device_time)
            if seen is Seen.DUPLICATE:
                self._metrics.uplinks_duplicate.inc()
                if self._broker_ack and self._spool.unpublished_from_before:
                    # Spooled before a restart, maybe not yet PUBACKed: no 2.04 yet.
                    raise UplinkRejected(C.SERVICE_UNAVAILABLE, "broker_unconfirmed",
                                         "not yet confirmed by the broker, retry later",
                                         max_age_s=self._overload_max_age_s)
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
                                uplink.transport, uplink.resources),
        )
        if not self._spool.has_room(record_size(record)):
            raise UplinkRejected(C.SERVICE_UNAVAILABLE, "spool_full", "spool full, retry later",
                                 max_age_s=self._overload_max_age_s)
        if self._in_flight >= self._max_in_flight:
            raise UplinkRejected(C.SERVICE_UNAVAILABLE, "overloaded", "overloaded, retry later",
                                 max_age_s=self._overload_max_age_s)
        if self._broker_ack and not self.broker_connected():
            raise UplinkRejected(C.SERVICE_UNAVAILABLE, "broker_unavailable",
                                 "no broker node reachable, retry later",
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
        if self._broker_ack:
            self._append_until_published(record, device, uplink, report.ack, seq,
                                         accepted_seq, reply)
            return

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
            verdict = self._settled(ok, device, uplink)
            reply(verdict)
            for waiter in waiters:
                waiter(verdict)

        self._spool.append(record, on_durable, accepted_seq, waiting_since=uplink.received_mono)

    def _append_until_published(self, record: Record, device: Device, uplink: Uplink,
                                ack: str | None, seq: int | None,
                                accepted_seq: SeqAccept | None, reply: Reply) -> None:
        """cluster.ack = "broker": spool the record, answer 2.04 once the broker PUBACKed
        it (a host lost for good then loses nothing it acknowledged), 5.03 with Max-Age if
        that takes over cluster.broker_ack_timeout_s. A timed-out record stays spooled and
        is published; the device's retry of it waits for that PUBACK in turn."""
        loop = asyncio.get_running_loop()
        waiting = [reply]  # this uplink's replies, its retransmissions' joined in
        if accepted_seq is not None:
            self._pending[(device.device_id, accepted_seq[1])] = (accepted_seq, waiting)
        timer: asyncio.TimerHandle | None = None
        in_flight = True

        def left_flight() -> None:
            nonlocal in_flight
            if in_flight:
                in_flight = False
                self._in_flight -= 1

        def on_durable(ok: bool) -> None:
            nonlocal timer
            if ok:
                timer = loop.call_later(self._broker_ack_timeout_s, timed_out)
            else:
                finish(False)

        def timed_out() -> None:
            left_flight()
            self._metrics.broker_ack_timeouts.inc()
            verdict = self._unconfirmed_verdict()
            answered = waiting[:]
            waiting.clear()
            for waiter in answered:
                waiter(verdict)

        def published() -> None:
            if timer is not None:
                timer.cancel()
            if ack is not None:
                self._downlink.confirm(device.device_id, device.device_type, ack,
                                       lambda: finish(True))
            else:
                finish(True)

        def finish(ok: bool) -> None:
            left_flight()
            if seq is not None:
                self._pending.pop((device.device_id, seq), None)
            if ok and not waiting:  # answered 5.03 at the timeout, no retry waits:
                self._liveness.seen(device, uplink.received_at)  # no command rides
                self._metrics.uplinks_accepted.inc()
                return
            verdict = self._settled(ok, device, uplink)
            for waiter in waiting:
                waiter(verdict)

        self._spool.append(record, on_durable, accepted_seq, on_published=published)

    def _settled(self, ok: bool, device: Device, uplink: Uplink) -> Verdict:
        """The answer to an uplink whose record was committed (`ok`) or not, counted."""
        if ok:
            self._liveness.seen(device, uplink.received_at)
            self._metrics.uplinks_accepted.inc()
            self._metrics.uplink_ack_seconds.observe(time.monotonic() - uplink.received_mono)
            return self._accepted(device, uplink)
        self._metrics.uplinks_rejected.labels("spool_error").inc()
        return Verdict(C.SERVICE_UNAVAILABLE, b"spool write failed",
                       max_age_s=self._overload_max_age_s)

    def _unconfirmed_verdict(self) -> Verdict:
        return Verdict(C.SERVICE_UNAVAILABLE, b"broker has not confirmed, retry later",
                       C.CONTENT_FORMAT_TEXT, self._overload_max_age_s, authenticated=True)

    def _unconfirmed(self, waiting: list[Reply], reply: Reply) -> None:
        """A retransmission still waiting for its uplink's PUBACK after the timeout."""
        if reply in waiting:
            waiting.remove(reply)
            self._metrics.broker_ack_timeouts.inc()
            reply(self._unconfirmed_verdict())

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
        """2.04, carrying the device's next downlink command if one waits (not over
        LwM2M: its commands are requests of their own, ingest/lwm2m)."""
        if uplink.transport.startswith("lwm2m"):
            return ACCEPTED
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
