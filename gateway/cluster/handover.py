"""What a host accepted for devices it held for another, handed to their next owner.

A host that owns a device it is not home for (its home host is not heard) notes the seqs
it accepts for it. When the device moves on (its home host is back, or another ranks
higher), the host sends those seqs to the new owner; the new owner counts each seq its own
replay window already holds as a duplicate (both hosts accepted it, so both publish it),
and merges the rest into its window, so it refuses them from then on (`merge_foreign` in
gateway/pipeline/replay.py). Pure logic, no I/O: the peer channel carries the entries (`S`
messages), the service reports the duplicates.
Never trusts an entry's shape: `decode` raises ValueError for anything malformed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from gateway.pipeline.replay import WINDOW, Seen

_MASK = (1 << WINDOW) - 1
MAX_SEQ = (1 << 63) - 1
MAX_ID_BYTES = 255
# (first seq noted, bits of first..first+63 noted, highest noted, bits of highest..highest-63)
Span = tuple[int, int, int, int]
_SPAN = struct.Struct("!qQqQ")
_COUNT = struct.Struct("!H")
MAX_BODY_BYTES = 1200  # one peer datagram, unfragmented on any path: entries per message
MAX_ENTRIES = 64


class Holdings:
    """One worker's seqs accepted for the devices it holds (owns, not home for), since it
    took them. Bounded: four integers per device, whatever the number of uplinks: the first
    64 seqs and the last 64 (the first are where a takeover's duplicate sits: the device's
    retransmission of what the dead host acknowledged last; the last keep the new owner
    from accepting a recent one again)."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self._spans: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self._spans)

    def note(self, device_id: str, seq: int, seen: Seen) -> None:
        """An accept (the pipeline's replay window calls this, in a cluster only)."""
        if device_id not in self.held:
            return
        span = self._spans.get(device_id)
        if span is None or seen is Seen.RESET:  # a restarted counter: what came before is moot
            self._spans[device_id] = [seq, 1, seq, 1]
            return
        _add(span, seq)

    def give_up(self, owns: Callable[[str], bool]) -> dict[str, Span]:
        """The spans of the devices noted here that this host no longer owns, removed."""
        gone = {device_id: (span[0], span[1], span[2], span[3])
                for device_id, span in self._spans.items() if not owns(device_id)}
        for device_id in gone:
            del self._spans[device_id]
        return gone

    def spans(self) -> dict[str, Span]:
        return {d: (s[0], s[1], s[2], s[3]) for d, s in self._spans.items()}


def _add(span: list[int], seq: int) -> None:
    lo, lo_bits, hi, hi_bits = span
    if 0 <= seq - lo < WINDOW:
        span[1] = lo_bits | 1 << (seq - lo)
    if seq > hi:
        jump = seq - hi
        span[3] = ((hi_bits << jump) | 1) & _MASK if jump < WINDOW else 1
        span[2] = seq
    elif hi - seq < WINDOW:
        span[3] = hi_bits | 1 << (hi - seq)


def seqs_of(span: Span) -> list[int]:
    """The seqs a span holds, ascending, each once, within 0..2^63-1."""
    lo, lo_bits, hi, hi_bits = span
    seqs = {lo + i for i in range(WINDOW) if lo_bits >> i & 1}
    seqs.update(hi - i for i in range(WINDOW) if hi_bits >> i & 1)
    return sorted(s for s in seqs if 0 <= s <= MAX_SEQ)


# -- the wire (the body of a peer channel `S` message, after its message id) -------------
def encode(spans: dict[str, Span]) -> list[bytes]:
    """The spans as message bodies of at most MAX_BODY_BYTES (MAX_ENTRIES entries) each."""
    bodies: list[bytes] = []
    entries: list[bytes] = []
    size = _COUNT.size
    for device_id, span in spans.items():
        ident = device_id.encode()
        if not 0 < len(ident) <= MAX_ID_BYTES:
            continue  # no registry id is that long (config checks), nothing to send
        entry = b"".join((bytes((len(ident),)), ident, _SPAN.pack(*span)))
        if entries and (size + len(entry) > MAX_BODY_BYTES or len(entries) == MAX_ENTRIES):
            bodies.append(_COUNT.pack(len(entries)) + b"".join(entries))
            entries, size = [], _COUNT.size
        entries.append(entry)
        size += len(entry)
    if entries:
        bodies.append(_COUNT.pack(len(entries)) + b"".join(entries))
    return bodies


def decode(body: bytes) -> dict[str, Span]:
    """A message body back to spans; ValueError if it is anything but well-formed."""
    try:
        (count,) = _COUNT.unpack_from(body)
        if not 0 < count <= MAX_ENTRIES:
            raise ValueError(f"{count} entries")
        at = _COUNT.size
        spans: dict[str, Span] = {}
        for _ in range(count):
            ident_len = body[at]
            ident = body[at + 1:at + 1 + ident_len]
            if not ident_len or len(ident) != ident_len:
                raise ValueError("truncated device id")
            at += 1 + ident_len
            lo, lo_bits, hi, hi_bits = _SPAN.unpack_from(body, at)
            at += _SPAN.size
            if lo < 0 or hi < 0:
                raise ValueError("negative seq")
            spans[ident.decode()] = (lo, lo_bits, hi, hi_bits)
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed handover: {e}") from None
    if at != len(body):
        raise ValueError("trailing bytes after the entries")
    return spans
