"""RFC 7252 section 4.2/4.8 retransmission of a confirmable request: when to resend, when
to give up, and how long a 5.03 asks a device to wait.

Pure arithmetic on the times and random draws handed in: no clock, no I/O, no randomness
of its own, so a test can drive it step by step with a fake clock.
"""

from __future__ import annotations

from dataclasses import dataclass

# RFC 7252 5.10.5: a response without Max-Age means 60 seconds.
DEFAULT_MAX_AGE_S = 60


@dataclass(frozen=True, slots=True)
class TransmissionParameters:
    """RFC 7252 4.8 transmission parameters (the defaults are the RFC's)."""

    ack_timeout_s: float = 2.0
    ack_random_factor: float = 1.5
    max_retransmit: int = 4

    def initial_timeout_s(self, draw: float) -> float:
        """The first timeout, a random point in [ACK_TIMEOUT, ACK_TIMEOUT * ACK_RANDOM_FACTOR].

        `draw` is a uniform random number in [0, 1).
        """
        return self.ack_timeout_s * (1.0 + draw * (self.ack_random_factor - 1.0))

    @property
    def max_transmit_span_s(self) -> float:
        """Longest time from the first transmission to the last retransmission (45 s)."""
        return self.ack_timeout_s * ((1 << self.max_retransmit) - 1) * self.ack_random_factor

    @property
    def max_transmit_wait_s(self) -> float:
        """Longest time from the first transmission until the sender gives up (93 s)."""
        return self.ack_timeout_s * ((2 << self.max_retransmit) - 1) * self.ack_random_factor


RFC7252 = TransmissionParameters()


class RetransmissionTimer:
    """The timer of one CON message: started at its first transmission, doubled at each
    retransmission, and exhausted when it fires after MAX_RETRANSMIT retransmissions."""

    __slots__ = ("deadline", "params", "retransmissions", "timeout_s")

    def __init__(self, now: float, draw: float, params: TransmissionParameters = RFC7252) -> None:
        self.params = params
        self.retransmissions = 0
        self.timeout_s = params.initial_timeout_s(draw)
        self.deadline = now + self.timeout_s

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def on_timeout(self, now: float) -> bool:
        """The timer fired at `now`: True means retransmit now (the timer is re-armed with
        the doubled timeout); False means MAX_RETRANSMIT is reached and the sender gives up."""
        if self.retransmissions >= self.params.max_retransmit:
            return False
        self.retransmissions += 1
        self.timeout_s *= 2
        self.deadline = now + self.timeout_s
        return True


def service_unavailable_wait_s(max_age_s: int | None) -> float:
    """How long a device waits after 5.03 before it tries again: the response's Max-Age."""
    return float(DEFAULT_MAX_AGE_S if max_age_s is None else max_age_s)
