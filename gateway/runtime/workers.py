"""Which worker process owns a device, and where each worker keeps its state.

With `gateway.workers = N` (N > 1) every device belongs to exactly one worker, chosen by
a stable hash of its id. Its replay window, liveness and downlink queue live only there,
so a retransmission arriving from a new NAT port (which the kernel's SO_REUSEPORT hash
may hand to any worker) still meets the state that dedups it: a worker that receives a
datagram for another worker's device forwards it to the owner.
"""

from __future__ import annotations

import socket
import zlib
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Settings


def owner(device_id: str, workers: int) -> int:
    """The index of the worker owning `device_id` (CRC-32: the same on every start)."""
    if workers <= 1:
        return 0
    return zlib.crc32(device_id.encode()) % workers


def worker_share(settings: Settings, workers: int) -> Settings:
    """One worker's part of the gateway-wide budgets, so N workers together hold to the
    configured figures: spool bytes, uplinks in flight, dead letters per second, reply
    cache entries (each worker serves about 1/N of the devices)."""
    if workers <= 1:
        return settings
    spool, limits, coap = settings.spool, settings.limits, settings.coap
    return settings.model_copy(update={
        "spool": spool.model_copy(update={"max_bytes": spool.max_bytes // workers}),
        "limits": limits.model_copy(update={
            "max_in_flight": max(1, limits.max_in_flight // workers),
            "dead_letters_per_s": limits.dead_letters_per_s / workers}),
        "coap": coap.model_copy(update={
            "dedup_max_entries": max(1, coap.dedup_max_entries // workers)}),
    })


@dataclass(frozen=True)
class StateFiles:
    """One worker's files. They sit together in the spool's directory."""

    spool: Path
    liveness: Path
    downlink: Path

    def all(self) -> tuple[Path, Path, Path]:
        return self.spool, self.liveness, self.downlink


def state_files(spool: Path, liveness: Path, worker: int, workers: int) -> StateFiles:
    """The files of `worker` out of `workers`: with one worker the configured names
    (`spool.sqlite`, `liveness.sqlite`, `downlink.sqlite`); with more, `.w{i}` before the
    suffix (`spool.w0.sqlite`, ...)."""
    downlink = spool.parent / "downlink.sqlite"
    if workers <= 1:
        return StateFiles(spool, liveness, downlink)
    return StateFiles(*(p.with_name(f"{p.stem}.w{worker}{p.suffix}")
                        for p in (spool, liveness, downlink)))


@dataclass(frozen=True)
class WorkerLinks:
    """What the supervisor hands one worker across the fork: its index, its CoAP socket
    (bound with SO_REUSEPORT to the shared port), its inbox and a sending end to every
    worker's inbox (gateway/runtime/siblings.py), and its control line (gateway/runtime/control.py)."""

    index: int
    workers: int
    udp: socket.socket | None  # None when coap.enabled is false
    inbox: socket.socket
    outboxes: list[socket.socket]
    control: socket.socket
