"""How long the device registry takes to load: 40,000 and 100,000 rows (best of 5).

Run: .venv/bin/python benchmarks/registry_load.py
The issue asks for 40,000 rows "well under a second"; the tests check the count, this the time.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from gateway.pipeline.registry import load_registry

TYPES = {"env_th": None, "power_meter": None, "gas": None, "vibration": None}
ROUNDS = 5


def write_registry(path: Path, rows: int) -> None:
    types = list(TYPES)
    with path.open("w") as f:
        f.write("device_id,type,token,report_interval_s,enabled\n")
        for i in range(rows):
            f.write(f"dev-{i:06d},{types[i % len(types)]},tok-{i:06d}-x9epxbc5udnvb8tg,"
                    f"{60 + i % 900},{'false' if i % 97 == 0 else 'true'}\n")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (40_000, 100_000):
            path = Path(tmp) / f"devices-{rows}.csv"
            write_registry(path, rows)
            best_s = float("inf")
            for _ in range(ROUNDS):
                started = time.perf_counter()
                registry = load_registry(path, TYPES)
                best_s = min(best_s, time.perf_counter() - started)
            assert len(registry) == rows
            print(f"{rows:>7} devices ({path.stat().st_size / 1e6:.1f} MB): "
                  f"{best_s * 1000:.0f} ms (best of {ROUNDS}), "
                  f"{best_s / rows * 1e6:.2f} µs per row")


if __name__ == "__main__":
    main()
