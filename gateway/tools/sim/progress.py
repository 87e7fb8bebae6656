"""The live progress line: one carriage-return line on a terminal, a plain line every few
seconds otherwise (CI logs). Writes to stderr only, so stdout keeps the summary clean.

Plain text on purpose: no dependency, no refresh thread competing with the event loop.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

from gateway.tools.sim.ledger import Snapshot


class Progress:
    def __init__(self, stream: TextIO | None = None, *, every_s: float | None = None) -> None:
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._every_s = every_s if every_s is not None else (1.0 if self._tty else 10.0)
        self._started = time.monotonic()
        self._last_at = 0.0
        self._last_sent = 0
        self._last_len = 0

    def update(self, figures: Snapshot, phase: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_at < self._every_s:
            return
        span = now - self._last_at if self._last_at else now - self._started
        rate = (figures.sent - self._last_sent) / span if span > 0 else 0.0
        self._last_at, self._last_sent = now, figures.sent
        errors = " ".join(f"{c}:{n}" for c, n in figures.rejected_by_code) or "-"
        line = (f"[{now - self._started:5.0f}s {phase}] {rate:5.0f}/s sent {figures.sent} "
                f"acked {figures.acked} delivered {figures.delivered} "
                f"pending {figures.pending} | awake {figures.awake}+{figures.waiting} "
                f"retx {figures.retransmissions} timeout {figures.timeouts} "
                f"5.03 {figures.service_unavailable} 4.29 {figures.rate_limited} | err {errors}")
        if self._tty:
            # One line that fits, or the carriage return cannot rewrite it.
            line = line[: shutil.get_terminal_size().columns - 1]
            pad = max(0, self._last_len - len(line))
            self._stream.write("\r" + line + " " * pad)
            self._last_len = len(line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._tty and self._last_len:
            self._stream.write("\n")
            self._stream.flush()
