"""`nbiot-gateway sim --make-registry N --out FILE`: a device registry CSV for a fleet of N,
with the plant's mix of device types and a random token per device.

It writes a new file only (never appends to or edits an existing registry).
"""

from __future__ import annotations

import csv
import secrets
from collections.abc import Iterable
from pathlib import Path

# A battery plant: many climate sensors, a meter per feeder, vibration on every motor and
# pump, hydrogen and gas detection in the charging rooms.
TYPE_MIX = {"env_th": 0.40, "power_meter": 0.20, "vibration": 0.25, "gas": 0.15}
ID_PREFIX = {"env_th": "th", "power_meter": "pm", "vibration": "vib", "gas": "gas"}
TOKEN_BYTES = 8  # 16 hex characters


def type_counts(n: int, types: Iterable[str]) -> dict[str, int]:
    """How many of each type in a fleet of n: the plant's mix over the types the config
    defines (a type it does not know gets an equal share), rounded so they add up to n."""
    names = list(types)
    if not names:
        raise ValueError("the config defines no device types")
    default = 1.0 / len(names)
    weights = {t: TYPE_MIX.get(t, default) for t in names}
    total = sum(weights.values())
    counts = {t: int(n * w / total) for t, w in weights.items()}
    for t in sorted(names, key=lambda t: -weights[t])[: n - sum(counts.values())]:
        counts[t] += 1
    return counts


def make_registry(path: Path, n: int, types: Iterable[str], report_interval_s: int = 60) -> Path:
    """Write a registry of n devices to `path` (which must not exist yet)."""
    rows: list[tuple[float, str, str]] = []
    for dtype, count in type_counts(n, types).items():
        prefix = ID_PREFIX.get(dtype, dtype.replace("_", "-"))
        # Spread each type evenly over the file, so that its first rows are a mix too.
        rows += [((i - 0.5) / count, f"{prefix}-{i:05d}", dtype) for i in range(1, count + 1)]
    rows.sort()
    with path.open("x", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["device_id", "type", "token", "report_interval_s", "enabled"])
        for _, device_id, dtype in rows:
            writer.writerow([device_id, dtype, secrets.token_hex(TOKEN_BYTES), report_interval_s,
                             "true"])
    return path
