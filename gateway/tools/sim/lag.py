"""How late a simulator process's event loop runs: a timer every `interval_s` that records
by how much it overslept. Lag adds straight onto every latency the simulator stamps, so
the summary uses these samples to say when its latencies are its own delay, not the
gateway's.

It never changes what the process does, except through `stall_ms` (a self-test: burn CPU
on the loop once a second, as an overloaded simulator would).
"""

from __future__ import annotations

import asyncio
import time
from array import array

SAMPLE_EVERY_S = 0.05
STALL_EVERY_S = 1.0


class LagMonitor:
    """`start()` it on the running loop, `stop()` it; `samples_ms` holds one oversleep
    per tick, in milliseconds."""

    def __init__(self, interval_s: float = SAMPLE_EVERY_S, stall_ms: float = 0.0) -> None:
        self.interval_s = interval_s
        self.stall_ms = stall_ms
        self.samples_ms: array[float] = array("d")
        self._tick_handle: asyncio.TimerHandle | None = None
        self._stall_handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._arm_tick()
        if self.stall_ms > 0:
            self._stall_handle = asyncio.get_running_loop().call_later(STALL_EVERY_S, self._stall)

    def stop(self) -> None:
        for handle in (self._tick_handle, self._stall_handle):
            if handle is not None:
                handle.cancel()
        self._tick_handle = self._stall_handle = None

    def _arm_tick(self) -> None:
        due = time.monotonic() + self.interval_s
        self._tick_handle = asyncio.get_running_loop().call_later(self.interval_s, self._tick, due)

    def _tick(self, due: float) -> None:
        # time.monotonic(), not loop.time(): uvloop's clock is cached per loop turn, and a
        # timer run late in a long turn is exactly the lag to catch.
        self.samples_ms.append(max(0.0, time.monotonic() - due) * 1000.0)
        self._arm_tick()

    def _stall(self) -> None:
        end = time.monotonic() + self.stall_ms / 1000.0
        while time.monotonic() < end:
            pass  # busy: an overloaded loop burns CPU, it does not sleep
        self._stall_handle = asyncio.get_running_loop().call_later(STALL_EVERY_S, self._stall)
