"""Timestamps as they appear in MQTT messages: RFC 3339, UTC, milliseconds."""

from __future__ import annotations

import math
from datetime import UTC, datetime

# "2025-11-23T12:13:20" per whole second: formatting a datetime costs ~1.3 µs, and every
# uplink formats one or two timestamps, nearly always of a second already seen.
_SECONDS_CACHED = 4096
_seconds: dict[int, str] = {}


def rfc3339_ms(epoch_s: float) -> str:
    """`1763900000.0` -> `"2025-11-23T12:13:20.000Z"`, exactly as
    `datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")` writes it."""
    if epoch_s < 0:
        return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    # datetime's own rounding: the fraction to the nearest microsecond, half to even.
    fraction, whole = math.modf(epoch_s)
    micros = round(fraction * 1e6)
    second = int(whole)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    prefix = _seconds.get(second)
    if prefix is None:
        if len(_seconds) >= _SECONDS_CACHED:
            _seconds.clear()
        prefix = _seconds[second] = datetime.fromtimestamp(second, UTC).isoformat()[:19]
    return f"{prefix}.{micros // 1000:03d}Z"
