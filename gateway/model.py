"""Plain typed data passed between stages: Uplink in, Verdict back, Record to the spool.

No behaviour and no I/O here; every stage depends on this module, it depends on none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class Uplink:
    """One device report as ingest hands it to the pipeline, transport details stripped."""

    device_id: str
    token: str | None
    content_format: int | None  # None: the request carried no Content-Format option
    payload: bytes
    transport: str  # "coap" or "coaps"
    remote: str  # "host:port", for logs and the dead-letter topic
    received_at: float  # wall clock, seconds since the epoch
    received_mono: float  # monotonic clock, for the ack latency histogram
    # coaps: the device id the DTLS handshake authenticated (its PSK identity); None over
    # plain CoAP, or when that device's key changed since the handshake.
    peer_identity: str | None = None
    # LwM2M (transport "lwm2m"): the report already read from the device's resources by
    # ingest, `{"seq": .., "ts": .., field: value}` (`payload` is then the raw bytes, for
    # dead letters), and the resources no field of the type maps, path -> value.
    fields: Mapping[str, object] | None = None
    resources: Mapping[str, object] | None = None
    # Some of the type's fields, not a whole report (an LwM2M notification carries the one
    # resource observed): validated alike, no field required.
    partial: bool = False


@dataclass(slots=True, frozen=True)
class Verdict:
    """The pipeline's answer; ingest turns it into a CoAP response."""

    code: int
    payload: bytes = b""
    content_format: int | None = None
    max_age_s: int | None = None
    # False until the device proved who it is: then an error reply must not be larger
    # than the request (RFC 7252 11.3, no amplification for spoofed sources).
    authenticated: bool = False
    # Location-Path segments of a 2.01 Created (an LwM2M registration's `/rd/{id}`).
    location: tuple[str, ...] = ()


@dataclass(slots=True, frozen=True)
class Record:
    """What the spool keeps and the publisher sends: one MQTT message, QoS 1."""

    topic: str
    payload: bytes
    retain: bool = False
    # Spool row id, set once the record is durable (0 before).
    spool_id: int = field(default=0, compare=False)
