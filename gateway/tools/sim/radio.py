"""The NB-IoT radio path as the simulator models it: latency by coverage class, loss in
both directions, and a carrier NAT whose public port for a device changes now and then.

Pure decisions from an injected clock and random source; it sends nothing itself.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class Coverage(StrEnum):
    """3GPP coverage enhancement level: more repetitions, so more latency, at deeper levels."""

    CE0 = "CE0"
    CE1 = "CE1"
    CE2 = "CE2"


@dataclass(frozen=True, slots=True)
class OneWayLatency:
    """A triangular distribution of one-way latency in seconds."""

    low_s: float
    mode_s: float
    high_s: float


# One-way latencies with the radio already connected (RRC set-up after PSM is the access
# delay before the first transmission, not part of these). Round trips of ~0.4 s at CE0,
# ~1.3 s at CE1 and 3-5 s at CE2: at CE2 a round trip often exceeds ACK_TIMEOUT, so CE2
# devices retransmit spuriously, as they do in the field with RFC 7252's defaults.
LATENCY = {
    Coverage.CE0: OneWayLatency(0.08, 0.2, 0.6),
    Coverage.CE1: OneWayLatency(0.4, 0.6, 1.2),
    Coverage.CE2: OneWayLatency(1.0, 1.6, 3.0),
}


class Radio:
    """Latency and loss draws for the whole fleet (one random source keeps runs repeatable)."""

    def __init__(
        self,
        rng: random.Random,
        *,
        loss_up: float = 0.0,
        loss_down: float = 0.0,
        latency_scale: float = 1.0,
    ) -> None:
        self._rng = rng
        self.loss_up = loss_up
        self.loss_down = loss_down
        self.latency_scale = latency_scale

    def latency_s(self, coverage: Coverage) -> float:
        lat = LATENCY[coverage]
        return self._rng.triangular(lat.low_s, lat.high_s, lat.mode_s) * self.latency_scale

    def uplink_lost(self) -> bool:
        return self.loss_up > 0 and self._rng.random() < self.loss_up

    def downlink_lost(self) -> bool:
        return self.loss_down > 0 and self._rng.random() < self.loss_down


class NatMapping:
    """A carrier NAT's mapping of one awake device to a public UDP port.

    Each mapping has a generation; a new generation is a new public source port. The
    mapping changes when it sat idle past `idle_timeout_s` (carrier NATs keep UDP state
    briefly) or, at random with `rebind_probability`, on a retransmission. A reply that
    comes back to an older generation finds no mapping and is dropped by the NAT.
    """

    __slots__ = ("_clock", "_last_outbound", "_rng", "generation", "idle_timeout_s",
                 "rebind_probability")

    def __init__(
        self,
        clock: Callable[[], float],
        rng: random.Random,
        *,
        idle_timeout_s: float,
        rebind_probability: float,
        opened_at: float | None = None,
    ) -> None:
        self._clock = clock
        self._rng = rng
        self.idle_timeout_s = idle_timeout_s
        self.rebind_probability = rebind_probability
        self.generation = 0
        # The device's first datagram opened the mapping (default: now).
        self._last_outbound = clock() if opened_at is None else opened_at

    def _idle_expired(self, now: float) -> bool:
        return now - self._last_outbound > self.idle_timeout_s

    def outbound(self) -> bool:
        """A datagram leaves the device now (a retransmission); True if it leaves through a
        new public port. The first transmission of a wake always opens a fresh mapping."""
        now = self._clock()
        rebound = self._idle_expired(now) or (
            self.rebind_probability > 0 and self._rng.random() < self.rebind_probability)
        if rebound:
            self.generation += 1
        self._last_outbound = now
        return rebound

    def inbound_allowed(self, generation: int, at: float | None = None) -> bool:
        """Does a reply addressed to mapping `generation` still reach the device now (or
        at time `at`)?"""
        return generation == self.generation and not self._idle_expired(
            self._clock() if at is None else at)
