"""The simulator's books: every report sent, how the gateway answered it, and whether the
MQTT witness saw it, keyed by (device_id, seq). Each fleet process keeps its own; at the
end they are merged into one.

Bookkeeping only: no I/O, no clock of its own (callers pass CLOCK_MONOTONIC times). An
acked report that the witness never sees is `lost`; the ledger never guesses, it only
counts.
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Literal

from gateway.tools.sim.payloads import Fault

Key = tuple[str, int]


@dataclass(slots=True)
class Entry:
    """One report whose story is not complete: not yet answered, or not yet delivered."""

    sent_at: float
    acked: bool = False
    rejected: bool = False
    delivered: bool = False
    done: bool = False  # the device stopped trying (acked, rejected or gave up)
    lwm2m: bool = False  # a Send of an LwM2M device (its own figures too)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The figures the live progress line shows, summed over the fleet's processes."""

    sent: int = 0
    acked: int = 0
    delivered: int = 0
    pending: int = 0  # acked, not yet seen by the witness
    retransmissions: int = 0
    timeouts: int = 0
    service_unavailable: int = 0
    rate_limited: int = 0
    rejected_by_code: tuple[tuple[str, int], ...] = ()
    awake: int = 0
    waiting: int = 0

    def __add__(self, other: Snapshot) -> Snapshot:
        rejected = Counter(dict(self.rejected_by_code)) + Counter(dict(other.rejected_by_code))
        summed = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(Snapshot)
                  if f.name != "rejected_by_code"}
        return Snapshot(**summed, rejected_by_code=tuple(sorted(rejected.items())))


@dataclass
class Ledger:
    """Counters and open entries of one simulation run."""

    sent: int = 0  # distinct reports, counted at their first transmission
    transmissions: int = 0  # every datagram a device sent, retransmissions included
    retransmissions: int = 0  # RFC 7252 retransmissions (same message ID)
    acked: int = 0
    rejected_by_code: Counter[str] = field(default_factory=Counter)
    service_unavailable: int = 0  # 5.03 answers that made a device wait Max-Age and retry
    rate_limited: int = 0  # 4.29 answers, likewise (RFC 8516)
    timeouts: int = 0  # exchanges given up after MAX_RETRANSMIT
    abandoned: int = 0  # reports still unanswered when the run ended
    resets: int = 0
    nat_rebinds: int = 0
    stale_replies: int = 0  # replies whose token did not match (ignored, as RFC 7252 asks)
    # LwM2M devices (gateway/tools/sim/lwm2m.py): their share of the figures above, and
    # what the registration interface and the gateway's requests did.
    lwm2m_sent: int = 0
    lwm2m_acked: int = 0
    lwm2m_delivered: int = 0
    lwm2m_acked_undelivered: int = 0
    lwm2m_registers: int = 0  # Register answered 2.01
    lwm2m_updates: int = 0  # Update answered 2.04 (after a NAT rebind, or asked to)
    lwm2m_refused: Counter[str] = field(default_factory=Counter)  # "register 4.03": n, ...
    lwm2m_requests: Counter[str] = field(default_factory=Counter)  # "write 2.04": n, ...
    lwm2m_interval_writes: int = 0  # Writes of the reporting interval applied
    downlinks_applied: int = 0  # commands received in a 2.04 and applied (each id once)
    delivered: int = 0
    duplicates_delivered: int = 0
    delivered_unacked: int = 0  # delivered although the device never saw its 2.04
    delivered_rejected: int = 0  # delivered although the device was refused: a gateway bug
    foreign_delivered: int = 0  # on the topic but never sent in this run
    dead_letters_by_reason: Counter[str] = field(default_factory=Counter)
    faults_injected: Counter[str] = field(default_factory=Counter)
    # fault kind -> response code -> count, to check each fault drew the answer it should
    fault_answers: dict[str, Counter[str]] = field(default_factory=dict)
    ack_latency_ms: array[float] = field(default_factory=lambda: array("d"))
    delivery_latency_ms: array[float] = field(default_factory=lambda: array("d"))
    open: dict[Key, Entry] = field(default_factory=dict)
    acked_undelivered: int = 0
    # device_id -> [first seq of the run, bitmask of delivered seqs]: exact duplicate
    # detection in a few bytes per device, whatever the run length.
    _delivered_seqs: dict[str, list[int]] = field(default_factory=dict)
    # LwM2M devices: the gateway makes a Send's seq its reading time in ms, far too sparse
    # for a bitmask; a set of the seqs delivered instead (~70 bytes a report).
    _sparse_seqs: dict[str, set[int]] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        """Acked reports the witness has not seen (final once the grace period is over)."""
        return self.acked_undelivered

    @property
    def lwm2m_lost(self) -> int:
        return self.lwm2m_acked_undelivered

    def snapshot(self, awake: int, waiting: int) -> Snapshot:
        return Snapshot(self.sent, self.acked, self.delivered, self.acked_undelivered,
                        self.retransmissions, self.timeouts, self.service_unavailable,
                        self.rate_limited, tuple(sorted(self.rejected_by_code.items())), awake,
                        waiting)

    def seal(self) -> None:
        """The run is over: drop the per-report state, keep the counters and samples (what
        travels to the process that merges the books)."""
        self.open = {}
        self._delivered_seqs = {}
        self._sparse_seqs = {}

    def merge(self, other: Ledger) -> None:
        """Add another fleet process's sealed books to these."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name in ("open", "_delivered_seqs", "_sparse_seqs"):
                continue
            if isinstance(mine, int):
                setattr(self, f.name, mine + theirs)
            elif isinstance(mine, Counter | array):
                mine += theirs
            else:  # fault_answers: kind -> Counter of codes
                for kind, answers in theirs.items():
                    mine.setdefault(kind, Counter()).update(answers)

    # -- the device side -----------------------------------------------------------------
    def first_seq(self, device_id: str, seq: int) -> None:
        """Declare a device and the seq of its first report in this run."""
        self._delivered_seqs[device_id] = [seq, 0]

    def sparse_seqs(self, device_id: str) -> None:
        """Declare a device whose seqs are not consecutive (an LwM2M device's reading times)."""
        self._sparse_seqs[device_id] = set()

    def report_sent(self, key: Key, now: float, fault: Fault | None, lwm2m: bool = False) -> None:
        self.sent += 1
        self.open[key] = Entry(now, lwm2m=lwm2m)
        if lwm2m:
            self.lwm2m_sent += 1
        if fault is not None:
            self.faults_injected[fault] += 1

    def report_acked(self, key: Key, now: float, exchange_started_at: float) -> None:
        self.acked += 1
        self.ack_latency_ms.append((now - exchange_started_at) * 1000.0)
        entry = self.open.get(key)
        if entry is None or entry.done:
            return
        entry.acked = entry.done = True
        if entry.lwm2m:
            self.lwm2m_acked += 1
            if not entry.delivered:
                self.lwm2m_acked_undelivered += 1
        if entry.delivered:
            del self.open[key]
        else:
            self.acked_undelivered += 1

    def report_rejected(self, key: Key, code: str, fault: Fault | None) -> None:
        self.rejected_by_code[code] += 1
        if fault is not None:
            self.fault_answers.setdefault(fault, Counter())[code] += 1
        entry = self.open.get(key)
        if entry is None or entry.done:
            return
        entry.rejected = entry.done = True
        if entry.delivered:  # kept open otherwise, to catch a delivery that should not be
            self.delivered_rejected += 1
            del self.open[key]

    def report_given_up(self, key: Key, why: Literal["timeout", "reset", "abandoned"]) -> None:
        """The device stopped trying without an answer; a delivery may still show up."""
        if why == "timeout":
            self.timeouts += 1
        elif why == "reset":
            self.resets += 1
        else:
            self.abandoned += 1
        entry = self.open.get(key)
        if entry is None or entry.done:
            return
        entry.done = True
        if entry.delivered:
            self.delivered_unacked += 1
            del self.open[key]

    # -- the witness side ----------------------------------------------------------------
    def report_delivered(self, device_id: str, seq: int, now: float) -> None:
        seen = self._delivered_seqs.get(device_id)
        if seen is None:
            self._sparse_delivered(device_id, seq, now)
            return
        if seq < seen[0]:
            self.foreign_delivered += 1
            return
        bit = 1 << (seq - seen[0])
        if seen[1] & bit:
            self.duplicates_delivered += 1
            return
        key = (device_id, seq)
        entry = self.open.get(key)
        if entry is None:
            self.foreign_delivered += 1
            return
        seen[1] |= bit
        self._delivered(key, entry, now)

    def _sparse_delivered(self, device_id: str, seq: int, now: float) -> None:
        seen = self._sparse_seqs.get(device_id)
        if seen is None:
            self.foreign_delivered += 1
            return
        if seq in seen:
            self.duplicates_delivered += 1
            return
        key = (device_id, seq)
        entry = self.open.get(key)
        if entry is None:
            self.foreign_delivered += 1
            return
        seen.add(seq)
        self._delivered(key, entry, now)

    def _delivered(self, key: Key, entry: Entry, now: float) -> None:
        if entry.rejected:
            self.delivered_rejected += 1
            del self.open[key]
            return
        self.delivered += 1
        self.delivery_latency_ms.append((now - entry.sent_at) * 1000.0)
        entry.delivered = True
        if entry.lwm2m:
            self.lwm2m_delivered += 1
            if entry.acked:
                self.lwm2m_acked_undelivered -= 1
        if entry.acked:
            self.acked_undelivered -= 1
            del self.open[key]
        elif entry.done:
            self.delivered_unacked += 1
            del self.open[key]

    def dead_letter(self, reason: str) -> None:
        self.dead_letters_by_reason[reason] += 1
