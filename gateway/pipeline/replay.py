"""Which (device, seq) were accepted: a high-water mark and a 64-seq window per device.

A seq above the mark, or inside the window and not seen, is new; one seen in the window
is a duplicate (answered 2.04, never forwarded twice); one below the window is stale
unless the device's clock (`ts`) moved forward, which is how a device that rebooted and
restarted its counter is told from a replay. The state is saved in the spool's commit,
so it holds across restarts. Pure in-memory logic: no I/O here.

Every operation is O(1) whatever the seq (up to 2^63-1): a jump of WINDOW or more starts
a fresh bitmap instead of shifting the old one out. What a huge jump means: the device's
mark moves there, so every lower seq is stale from then on unless it carries a newer `ts`
(then it is a restarted counter). A device that sends INT64_MAX once must send `ts` to
come back down; without `ts` it gets 4.00 stale_seq, which says so.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass

WINDOW = 64
_MASK = (1 << WINDOW) - 1


class Seen(enum.Enum):
    NEW = "new"
    DUPLICATE = "duplicate"
    STALE = "stale"
    RESET = "reset"  # below the window, but a newer device time: the counter restarted


# What is saved per device: (high-water mark, bitmap of hwm..hwm-63, last device time).
SeqState = tuple[int, int, float | None]
# One accepted uplink, as the spool's writer replays it: (device, seq, ts, what check said)
SeqAccept = tuple[str, int, float | None, Seen]


@dataclass(slots=True)
class _DeviceSeqs:
    hwm: int
    bitmap: int  # bit i set: seq hwm - i was accepted
    last_ts: float | None


class ReplayWindow:
    def __init__(self, saved: dict[str, SeqState] | None = None) -> None:
        self._state = {device_id: _DeviceSeqs(*state) for device_id, state in (saved or {}).items()}

    def __len__(self) -> int:
        return len(self._state)

    def devices(self) -> list[str]:
        return list(self._state)

    def check(self, device_id: str, seq: int, ts: float | None) -> Seen:
        s = self._state.get(device_id)
        if s is None or seq > s.hwm:
            return Seen.NEW
        clock_moved_on = ts is not None and s.last_ts is not None and ts > s.last_ts
        if s.hwm - seq < WINDOW:
            if not s.bitmap >> (s.hwm - seq) & 1:
                return Seen.NEW
            # A retransmission carries the time it was sent with, never a newer one than
            # the newest accepted: a newer time on a seen seq is a restarted counter.
            return Seen.RESET if clock_moved_on else Seen.DUPLICATE
        return Seen.RESET if clock_moved_on else Seen.STALE

    def accept(self, device_id: str, seq: int, ts: float | None, seen: Seen) -> None:
        """Record seq as accepted (`seen` is what `check` said of it)."""
        s = self._state.get(device_id)
        if s is None or seen is Seen.RESET:
            s = self._state[device_id] = _DeviceSeqs(seq, 1, ts)
        elif seq > s.hwm:
            jump = seq - s.hwm
            # Never shift by a huge jump: 2^36 places would be a MemoryError.
            s.bitmap = ((s.bitmap << jump) | 1) & _MASK if jump < WINDOW else 1
            s.hwm = seq
        elif s.hwm - seq < WINDOW:
            s.bitmap |= 1 << (s.hwm - seq)
        # else: below the window (an accept replayed onto an older state): no bit for it
        if ts is not None and (s.last_ts is None or ts > s.last_ts):
            s.last_ts = ts

    def snapshot(self, device_id: str) -> SeqState | None:
        s = self._state.get(device_id)
        return None if s is None else (s.hwm, s.bitmap, s.last_ts)

    def restore(self, device_id: str, state: SeqState | None) -> None:
        """Put back a snapshot (a transaction that carried later accepts rolled back)."""
        if state is None:
            self._state.pop(device_id, None)
        else:
            self._state[device_id] = _DeviceSeqs(*state)

    def hwm(self, device_id: str) -> int | None:
        s = self._state.get(device_id)
        return None if s is None else s.hwm


class NotedReplayWindow(ReplayWindow):
    """A window that also tells `note` of every accept, at accept time (before its commit):
    a cluster host's record of what it accepted for the devices it holds for another. Only
    a cluster makes one, so a single host's accepts pay nothing for it."""

    def __init__(self, window: ReplayWindow, note: Callable[[str, int, Seen], None]) -> None:
        self._state = window._state
        self._note = note

    def accept(self, device_id: str, seq: int, ts: float | None, seen: Seen) -> None:
        super().accept(device_id, seq, ts, seen)
        self._note(device_id, seq, seen)


def merge_foreign(window: ReplayWindow, committing: Container[tuple[str, int]],
                  device_id: str, seqs: Iterable[int]) -> list[int]:
    """Merge another gateway host's accepts of `device_id` into `window` (so they are
    refused here from now on); return the duplicates: the seqs this host accepted too (in
    its window, or being committed now). A seq below the window cannot be told apart: it
    is neither merged nor counted."""
    duplicates = []
    for seq in sorted(set(seqs)):
        seen = window.check(device_id, seq, None)
        if seen is Seen.DUPLICATE or (device_id, seq) in committing:
            duplicates.append(seq)
        elif seen is Seen.NEW:
            window.accept(device_id, seq, None, Seen.NEW)
    return duplicates
