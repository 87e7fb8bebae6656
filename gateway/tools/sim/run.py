"""One simulation run, start to summary, from the parent process: start the witness (its
own process) and wait until it is subscribed, start the fleet processes (devices split by
index), route each one's deliveries to it, read the gateway's /metrics, say go, show the
merged progress, collect each process's books, read /metrics again, and summarize.

The parent drives no device: it only coordinates, so its own loop never delays a figure.
It owns every child and pipe it starts and stops them on the way out, error or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import os
import random
import resource
import socket
import time
from array import array
from collections.abc import Sequence

from gateway.config import Settings, SimSection
from gateway.errors import ConfigError
from gateway.pipeline.registry import Device, Registry
from gateway.tools.sim.gateway_side import GatewayReading, ack_latency_ms, metrics_url, read_gateway
from gateway.tools.sim.ledger import Ledger, Snapshot
from gateway.tools.sim.processes import Child, SimulatorError, WitnessError
from gateway.tools.sim.progress import Progress
from gateway.tools.sim.report import Summary, percentiles
from gateway.tools.sim.shard import ShardResult, ShardSpec
from gateway.tools.sim.witness import WitnessSpec, WitnessStats

TICK_S = 0.25
START_TIMEOUT_S = 60.0  # a child's start: imports, and 40,000 devices to build
PHASES = ("running", "draining", "grace", "done")
PIPE_BYTES = 1 << 20  # each witness->fleet pipe: room for ~30,000 deliveries in a burst

__all__ = ["SimulatorError", "WitnessError", "simulate", "split_by_index"]


def resolve_target(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise ConfigError([f"sim.host: cannot resolve {host!r}: {e.strerror}"]) from None
    family, _, _, _, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


def split_by_index(rows: Sequence[Device], processes: int) -> list[tuple[int, list[Device]]]:
    """(first index, rows) for each process: consecutive slices as equal as can be."""
    n = len(rows)
    bounds = [n * k // processes for k in range(processes + 1)]
    return [(bounds[k], list(rows[bounds[k]:bounds[k + 1]])) for k in range(processes)]


async def simulate(
    settings: Settings,
    registry: Registry,
    sim: SimSection | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Run the fleet described by `sim` (default: settings.sim) against the gateway."""
    sim = sim or settings.sim
    rows = list(registry)
    count = sim.devices or len(rows)
    if count > len(rows):
        raise ConfigError([f"sim.devices: {count} devices asked for, but the registry "
                           f"{registry.source} has {len(rows)}; make a bigger one with "
                           f"`nbiot-gateway sim --make-registry {count} --out FILE`"])
    if sim.lwm2m_share > 0 and not (settings.lwm2m.enabled and settings.lwm2m.allow_nosec):
        raise ConfigError(["sim.lwm2m_share: the simulator's LwM2M devices register over plain "
                           "UDP: the gateway needs [lwm2m] enabled = true and allow_nosec = true"])
    if sim.lwm2m_listen_s is None:  # listen as long as the gateway holds its requests
        sim = sim.model_copy(update={"lwm2m_listen_s": settings.lwm2m.awake_s})
    seed = sim.seed if sim.seed is not None else random.SystemRandom().randrange(2**31)
    family, target = resolve_target(sim.host, sim.port or settings.coap.port)
    shares = split_by_index(rows[:count], min(sim.processes, count))
    run = Run(settings, sim, progress)
    try:
        await run.start(shares, target, family, seed)
        results, witness_stats, elapsed_s = await run.go()
    finally:
        await run.stop()
    return summarize(results, witness_stats, run, count=count, seed=seed, elapsed_s=elapsed_s,
                     target=target)


class Run:
    """The children of one run and the gateway readings around it."""

    def __init__(self, settings: Settings, sim: SimSection, progress: Progress | None) -> None:
        self.settings = settings
        self.sim = sim
        self.progress = progress
        self.witness: Child | None = None
        self.shards: list[Child] = []
        self.gateway_url = metrics_url(settings.metrics, sim.host)
        self.gateway_before: GatewayReading | None = None
        self.gateway_after: GatewayReading | None = None
        self.cpu_at_go = 0.0

    async def start(self, shares: list[tuple[int, list[Device]]], target: tuple[str, int],
                    family: socket.AddressFamily, seed: int) -> None:
        """Witness subscribed, fleet built and routed: ready for `go`."""
        settings, sim = self.settings, self.sim
        pipes = [os.pipe() for _ in shares]
        try:
            for read_end, _ in pipes:
                with contextlib.suppress(OSError):  # a smaller pipe only means smaller bursts
                    fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            write_ends = tuple(w for _, w in pipes)
            self.witness = await Child.start("witness", "gateway.tools.sim.witness", write_ends,
                                             WitnessError)
            prefix = settings.mqtt.topic_prefix
            tenant = settings.gateway.tenant
            await self.witness.send(WitnessSpec(settings.mqtt, f"{prefix}/{tenant}/+/+/up",
                                                f"{prefix}/{tenant}/invalid", write_ends))
            for k in range(len(shares)):
                self.shards.append(await Child.start(
                    f"fleet process {k + 1} of {len(shares)}", "gateway.tools.sim.shard", (pipes[k][0],)))
        finally:
            for read_end, write_end in pipes:  # the children hold their own copies now
                os.close(read_end)
                os.close(write_end)
        per_process_awake = math.ceil(sim.max_awake / len(shares))
        for k, ((first_index, rows), shard) in enumerate(zip(shares, self.shards, strict=True)):
            await shard.send(ShardSpec(
                index=k, devices=rows, first_index=first_index, sim=sim, types=dict(settings.types),
                max_payload_bytes=settings.coap.max_payload_bytes, target=target, family=family,
                seed=seed, max_awake=per_process_awake, feed_fd=pipes[k][0]))
        await self.witness.expect("subscribed", START_TIMEOUT_S)
        ids = [await shard.expect("ready", START_TIMEOUT_S) for shard in self.shards]
        await self.witness.send(ids)
        await self.witness.expect("routed", START_TIMEOUT_S)

    async def go(self) -> tuple[list[ShardResult], WitnessStats, float]:
        """The run itself: returns each fleet process's result, the witness's, the time."""
        assert self.witness is not None
        self.gateway_before = await asyncio.to_thread(read_gateway, self.gateway_url)
        self.cpu_at_go = time.process_time()
        loop = asyncio.get_running_loop()
        started = loop.time()
        for shard in self.shards:
            await shard.send("go")
        latest: list[tuple[str, Snapshot]] = [("running", Snapshot())] * len(self.shards)
        results = [asyncio.ensure_future(self._result_of(k, shard, latest))
                   for k, shard in enumerate(self.shards)]
        witness_failed = asyncio.ensure_future(self.witness.receive())
        try:
            while not all(r.done() for r in results):
                await asyncio.wait([*results, witness_failed], timeout=TICK_S,
                                   return_when=asyncio.FIRST_COMPLETED)
                if witness_failed.done():
                    kind, payload = witness_failed.result()  # SimulatorError if it died
                    raise WitnessError(str(payload) if kind == "failed" else
                                       f"the witness said {kind!r} during the run")
                for r in results:
                    if r.done():
                        r.result()  # raises if that fleet process failed
                self._show(latest)
            elapsed_s = loop.time() - started
            self._show(latest, force=True)
        finally:
            tasks = [*results, witness_failed]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # the first error is raised
        self.gateway_after = await asyncio.to_thread(read_gateway, self.gateway_url)
        self.witness.close_input()
        stats: WitnessStats = await self.witness.expect("stats", START_TIMEOUT_S)
        return [r.result() for r in results], stats, elapsed_s

    async def _result_of(self, k: int, shard: Child, latest: list[tuple[str, Snapshot]]
                         ) -> ShardResult:
        while True:
            kind, payload = await shard.receive()
            if kind == "progress":
                latest[k] = payload
            elif kind == "result":
                result: ShardResult = payload
                return result
            else:
                raise SimulatorError(f"the {shard.name} said {kind!r}: {payload}")

    def _show(self, latest: list[tuple[str, Snapshot]], force: bool = False) -> None:
        if self.progress is None:
            return
        phase = min((p for p, _ in latest), key=PHASES.index)
        total = sum((s for _, s in latest), Snapshot())
        self.progress.update(total, phase, force)

    async def stop(self) -> None:
        if self.progress is not None:
            self.progress.close()
        children = [c for c in (self.witness, *self.shards) if c is not None]
        await asyncio.gather(*(c.stop() for c in children))


def summarize(results: list[ShardResult], witness: WitnessStats, run: Run, *, count: int, seed: int,
              elapsed_s: float, target: tuple[str, int]) -> Summary:
    sim = run.sim
    ledger = Ledger()
    for result in results:
        ledger.merge(result.ledger)
    ledger.dead_letters_by_reason = witness.dead_letters_by_reason
    fleet_cpu_s = sum(r.cpu_s for r in results)
    sim_cpu_s = fleet_cpu_s + witness.cpu_s + (time.process_time() - run.cpu_at_go)
    fleet_lag = array("d")
    for result in results:
        fleet_lag.extend(result.lag_ms)
    gateway: dict[str, object] = {}
    before, after = run.gateway_before, run.gateway_after
    if before is not None and after is not None:
        uplinks = after.uplinks_received - before.uplinks_received
        gateway_cpu_s = after.cpu_s - before.cpu_s
        gateway = {
            "gateway_ack_latency_ms": ack_latency_ms(before, after),
            "gateway_uplinks": int(uplinks),
            "gateway_cpu_s": round(gateway_cpu_s, 2),
            "gateway_cpu_per_uplink_us": round(gateway_cpu_s / uplinks * 1e6, 1) if uplinks else None,
        }
    own_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = Summary.from_ledger(
        ledger,
        devices=count,
        profile=sim.profile,
        seed=seed,
        duration_s=sim.duration_s,
        interval_s=sim.interval_s,
        faulty_devices=sum(r.faulty_devices for r in results),
        lwm2m_devices=sum(r.lwm2m_devices for r in results),
        awake_peak=sum(r.awake_peak for r in results),
        max_awake=sum(r.max_awake for r in results),
        elapsed_s=round(elapsed_s, 2),
        sent_per_s=round(ledger.sent / sim.duration_s, 1),
        sim_cpu_s=round(sim_cpu_s, 2),
        sim_peak_rss_mb=round(sum(r.peak_rss_mb for r in results) + witness.peak_rss_mb
                              + own_rss_mb, 1),
        processes=len(results),
        fleet_cpu_s=round(fleet_cpu_s, 2),
        witness_cpu_s=round(witness.cpu_s, 2),
        sim_cpu_per_report_us=round(sim_cpu_s / ledger.sent * 1e6, 1) if ledger.sent else None,
        fleet_lag_ms=percentiles(fleet_lag),
        witness_lag_ms=percentiles(witness.lag_ms),
        witness_messages=witness.messages,
        **gateway,
    )
    if ledger.sent and not (ledger.acked or ledger.rejected_by_code or ledger.service_unavailable
                            or ledger.rate_limited):
        summary.notes.append(f"no answer at all from {target[0]}:{target[1]}: is the gateway running?")
    if summary.lost:
        summary.notes.append("acked reports never reached MQTT within the grace period")
    if run.gateway_url is not None and not gateway:
        summary.notes.append(f"the gateway's {run.gateway_url} did not answer: no gateway-side figures")
    return summary
