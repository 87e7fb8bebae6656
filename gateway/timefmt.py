"""Timestamps as they appear in MQTT messages: RFC 3339, UTC, milliseconds."""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339_ms(epoch_s: float) -> str:
    """`1763900000.0` -> `"2025-11-23T12:13:20.000Z"`."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
