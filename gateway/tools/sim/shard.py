"""One fleet process (`main()`, started by `gateway/tools/sim/processes.py`):
a share of the devices, split by index, driven on its own uvloop event loop. It books
its reports, takes the witness's deliveries from a pipe, reports progress, and hands its
sealed books to the parent at the end.

Its life: a spec in, the fleet built, `ready` with the device ids it sends as; `go`
starts the report window, then drain and grace as in docs/simulator.md. It owns every
socket and timer it opens and closes them on the way out. The end of its stdin (the
parent is gone) stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import uvloop

from gateway.config import DeviceType, SimSection
from gateway.pipeline.registry import Device
from gateway.runtime import gctune
from gateway.tools.sim.channel import Parent
from gateway.tools.sim.endpoints import Receiver, SharedPorts
from gateway.tools.sim.exchange import Link
from gateway.tools.sim.fleet import Fleet, build_devices, per_device_addresses
from gateway.tools.sim.lag import LagMonitor
from gateway.tools.sim.ledger import Ledger
from gateway.tools.sim.radio import Radio
from gateway.tools.sim.retransmit import RFC7252

# Descriptors kept back from the awake cap: the pipes, the loop, stdio, imports.
FD_RESERVE = 200
PROGRESS_EVERY_S = 0.25
COLLECT_EVERY_S = 60.0  # the cyclic garbage collector's one run a minute (_progress_until)
# The sockets that carry the devices' own addresses (gateway/tools/sim/endpoints.py): any
# number works; a few spread the replies over more than one receive buffer.
SHARED_PORTS = 64


@dataclass(frozen=True)
class ShardSpec:
    index: int
    devices: list[Device]  # this process's rows of the registry
    first_index: int  # the fleet-wide index of devices[0] (it picks the source address)
    sim: SimSection
    types: dict[str, DeviceType]
    max_payload_bytes: int
    target: tuple[str, int]
    family: socket.AddressFamily
    seed: int
    max_awake: int
    feed_fd: int  # the read end of the witness's pipe to us


@dataclass
class ShardResult:
    ledger: Ledger  # sealed
    faulty_devices: int
    lwm2m_devices: int
    awake_peak: int
    max_awake: int
    lag_ms: list[float]
    cpu_s: float  # from `go` to the end: building the fleet is not counted
    peak_rss_mb: float


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return hard if soft == resource.RLIM_INFINITY else soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


class DeliveryFeed(asyncio.Protocol):
    """The witness's pipe to this process: `@{arrival}` lines, then `{device_id} {seq}`
    lines, booked as they come (gateway/tools/sim/witness.py writes them)."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._rest = b""
        self._arrival = 0.0

    def data_received(self, data: bytes) -> None:
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        delivered = self._ledger.report_delivered
        for line in lines:
            if line[:1] == b"@":
                self._arrival = float(line[1:])
                continue
            device_id, _, seq = line.partition(b" ")
            delivered(device_id.decode(), int(seq), self._arrival)


class Shard:
    def __init__(self, spec: ShardSpec, parent: Parent) -> None:
        self.spec = spec
        self.parent = parent
        sim = spec.sim
        self.rng = random.Random(f"{spec.seed}:{spec.index}")
        self.loop = asyncio.get_running_loop()
        fd_limit = raise_fd_limit()
        receiver = Receiver()
        self.shared_ports = SharedPorts(SHARED_PORTS, spec.target) if (
            per_device_addresses(sim.host, sim.source_addresses)) else None
        link = Link(self.loop, spec.target, spec.family,
                    Radio(self.rng, loss_up=sim.loss_up, loss_down=sim.loss_down,
                          latency_scale=sim.latency_scale),
                    self.rng, RFC7252, sim.nat_idle_timeout_s, sim.nat_rebind_probability,
                    receiver, self.shared_ports)
        self.ledger = Ledger()
        self.devices = build_devices(spec.devices, spec.types, sim, self.rng, now_s=time.time(),
                                     first_index=spec.first_index)
        # An LwM2M device may hold its socket while it listens, outside the awake cap.
        listening = sum(1 for d in self.devices if d.speaks_lwm2m)
        # On shared ports an awake /up device holds no descriptor of its own.
        self.max_awake = max(1, spec.max_awake if self.shared_ports is not None else min(
            spec.max_awake, fd_limit - FD_RESERVE - listening))
        self.fleet = Fleet(self.devices, link, self.ledger, sim, spec.types,
                           max_awake=self.max_awake, max_payload_bytes=spec.max_payload_bytes)
        self.lag = LagMonitor(stall_ms=sim.loop_stall_ms)
        self._next_collect = self.loop.time() + COLLECT_EVERY_S

    async def run(self) -> ShardResult:
        sim, fleet, ledger, loop = self.spec.sim, self.fleet, self.ledger, self.loop
        cpu_at_start = time.process_time()
        started = loop.time()
        self.lag.start()
        try:
            fleet.start(sim.duration_s)
            await self._progress_until("running", deadline=started + sim.duration_s)
            fleet.stop()
            drain = asyncio.ensure_future(fleet.drain(sim.drain_s))
            await self._progress_until("draining", until=drain.done)
            await drain
            await self._progress_until("grace", deadline=loop.time() + sim.grace_s,
                                       until=lambda: ledger.acked_undelivered == 0)
        finally:
            self.lag.stop()
            fleet.stop()
            await fleet.drain(0)
        self._send_progress("done")
        cpu_s = time.process_time() - cpu_at_start
        ledger.seal()
        return ShardResult(
            ledger=ledger,
            faulty_devices=sum(1 for d in self.devices if d.fault is not None),
            lwm2m_devices=sum(1 for d in self.devices if d.speaks_lwm2m),
            awake_peak=fleet.awake_peak,
            max_awake=self.max_awake,
            lag_ms=self.lag.samples_ms.tolist(),
            cpu_s=cpu_s,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        )

    async def _progress_until(self, phase: str, *, deadline: float | None = None,
                              until: Callable[[], bool] | None = None) -> None:
        while True:
            self._send_progress(phase)
            if self.loop.time() >= self._next_collect:
                self._next_collect = self.loop.time() + COLLECT_EVERY_S
                gc.collect()
            if until is not None and until():
                return
            remaining = PROGRESS_EVERY_S if deadline is None else min(
                PROGRESS_EVERY_S, deadline - self.loop.time())
            if remaining <= 0:
                return
            await asyncio.sleep(remaining)

    def _send_progress(self, phase: str) -> None:
        fleet = self.fleet
        self.parent.send(("progress", (phase, self.ledger.snapshot(fleet.awake, len(fleet.waiting)))))


async def serve(parent: Parent) -> int:
    spec: ShardSpec = await parent.receive()
    shard = Shard(spec, parent)
    try:
        return await _serve(parent, shard)
    finally:
        if shard.shared_ports is not None:
            shard.shared_ports.close()


async def _serve(parent: Parent, shard: Shard) -> int:
    spec = shard.spec
    loop = asyncio.get_running_loop()
    feed, _ = await loop.connect_read_pipe(lambda: DeliveryFeed(shard.ledger),
                                           os.fdopen(spec.feed_fd, "rb", buffering=0))
    gctune.settle()  # the fleet just built lives to the end: out of every collection
    # Nor any collection while it runs: a fleet makes (almost) no reference cycles. 40 s at
    # 40,000 devices: 895 collections found 682 objects in cycles, and they cost ~10 % of
    # the fleet's CPU (docs/decisions.md). What cycles there are, the progress loop's
    # collection once a minute (COLLECT_EVERY_S) returns.
    gc.disable()
    parent.send(("ready", [d.device_id for d in shard.devices]))
    try:
        await parent.receive()  # go
    except EOFError:
        return 1
    run = asyncio.ensure_future(shard.run())
    orphaned = asyncio.ensure_future(_until_eof(parent))
    try:
        await asyncio.wait({run, orphaned}, return_when=asyncio.FIRST_COMPLETED)
        if not run.done():
            return 1  # the parent went away: nobody to report to
        parent.send(("result", run.result()))
    finally:
        run.cancel()
        orphaned.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        feed.close()
    return 0


async def _until_eof(parent: Parent) -> None:
    with contextlib.suppress(EOFError):
        while True:
            await parent.receive()


def main() -> int:
    async def run() -> int:
        return await serve(await Parent().open())

    return uvloop.run(run())

