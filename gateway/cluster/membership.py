"""Which gateway host owns a device, from the hosts this host hears.

Every host has the same list of hosts; each hears the others' heartbeats. A device belongs
to the live host that ranks highest for it (rendezvous hashing): while all are alive that
is its home host, and when one dies only its devices move, spread over the others, and
move back when it returns. No consensus: two hosts that cannot hear each other may both
take a device for a while, which can admit one duplicate (consumers drop it by
`(device_id, seq)`; the gateway counts it when the device moves back:
gateway/cluster/handover.py), never lose an uplink: every host accepts any device's datagram.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)


def score(device_id: bytes, seed: int) -> int:
    """How much a host (its `seed`) wants a device: CRC-32 (the same on every host and
    start), then murmur3's finaliser, as CRC alone is linear: without the mixing one host's
    devices would all fall to the same second host."""
    h = zlib.crc32(device_id, seed)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def seed(host: str) -> int:
    return zlib.crc32(host.encode() + b"\0")


def rank(device_id: str, hosts: Iterable[str]) -> list[str]:
    """`hosts` in the order they would own `device_id`."""
    key = device_id.encode()
    return sorted(hosts, key=lambda host: score(key, seed(host)), reverse=True)


class Membership:
    """This host's view of which hosts are alive. Not thread-safe: one event loop."""

    def __init__(self, me: str, hosts: Iterable[str], dead_after_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.me = me
        self.hosts = sorted(hosts)
        self._dead_after_s = dead_after_s
        self._clock = clock
        self._heard: dict[str, float] = {}  # host -> when last heard (monotonic)
        self._incarnation: dict[tuple[str, int], float] = {}  # each worker has its own
        self.workers: dict[str, int] = {}  # host -> its gateway.workers, as it says
        self._alive: tuple[str, ...] = (me,)
        self._seeds = {h: seed(h) for h in self.hosts}
        self.on_change: list[Callable[[tuple[str, ...], tuple[str, ...]], None]] = []

    @property
    def alive(self) -> tuple[str, ...]:
        return self._alive

    def heard(self, host: str, incarnation: float, workers: int, worker: int = 0) -> None:
        """A heartbeat (or any authentic message) from `host`'s `worker`."""
        self._heard[host] = self._clock()
        self.workers[host] = workers
        before = self._incarnation.get((host, worker))
        if before is not None and before != incarnation:
            log.warning("cluster: host %s restarted (its devices come back to it)", host)
        self._incarnation[(host, worker)] = incarnation
        if host not in self._alive:
            self.check()

    def check(self) -> None:
        """Recompute who is alive; run the change callbacks if that changed."""
        now = self._clock()
        alive = tuple(h for h in self.hosts if h == self.me
                      or now - self._heard.get(h, -1e18) < self._dead_after_s)
        if alive == self._alive:
            return
        before, self._alive = self._alive, alive
        for host in sorted(set(before) - set(alive)):
            log.warning("cluster: host %s not heard for %.1fs: dead; its devices go to %s",
                        host, self._dead_after_s, ", ".join(alive))
        for host in sorted(set(alive) - set(before)):
            log.info("cluster: host %s alive", host)
        for callback in self.on_change:
            callback(before, alive)

    def owner(self, device_id: str) -> str:
        """The live host owning `device_id` now."""
        key = device_id.encode()
        seeds = self._seeds
        best, best_score = self.me, -1
        for host in self._alive:
            wants = score(key, seeds[host])
            if wants > best_score:
                best, best_score = host, wants
        return best

    def owns(self, device_id: str) -> bool:
        return self.owner(device_id) == self.me
