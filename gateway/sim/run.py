"""One simulation run, start to summary: raise the open-files limit, build the fleet,
subscribe the witness, run the report window, drain exchanges in flight, wait a grace
period for acked reports to reach MQTT, and summarize.

It owns every socket and task it starts and closes them on the way out, error or not.
"""

from __future__ import annotations

import asyncio
import random
import resource
import socket
import time
from collections.abc import Callable

from gateway.config import Settings, SimSection
from gateway.errors import ConfigError
from gateway.registry import Registry
from gateway.sim.exchange import Link
from gateway.sim.fleet import Fleet, build_devices
from gateway.sim.ledger import Ledger
from gateway.sim.progress import Progress
from gateway.sim.radio import Radio
from gateway.sim.report import Summary
from gateway.sim.retransmit import RFC7252
from gateway.sim.witness import Witness, WitnessError

# Descriptors kept back from the awake cap: the witness, the loop, stdio, imports.
FD_RESERVE = 200
TICK_S = 0.25

__all__ = ["WitnessError", "raise_fd_limit", "simulate"]


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


def resolve_target(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise ConfigError([f"sim.host: cannot resolve {host!r}: {e.strerror}"]) from None
    family, _, _, _, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


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
    fd_limit = raise_fd_limit()
    max_awake = min(sim.max_awake, fd_limit - FD_RESERVE)
    if max_awake < 1:
        raise ConfigError([f"open-files limit {fd_limit} leaves no room for device sockets"])
    seed = sim.seed if sim.seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    family, target = resolve_target(sim.host, sim.port or settings.coap.port)
    link = Link(loop, target, family,
                Radio(rng, loss_up=sim.loss_up, loss_down=sim.loss_down,
                      latency_scale=sim.latency_scale),
                rng, RFC7252, sim.nat_idle_timeout_s, sim.nat_rebind_probability)
    ledger = Ledger()
    devices = build_devices(rows[:count], dict(settings.types), sim, rng, now_s=time.time())
    fleet = Fleet(devices, link, ledger, sim, dict(settings.types), max_awake=max_awake,
                  max_payload_bytes=settings.coap.max_payload_bytes)
    cpu_at_start, started = time.process_time(), loop.time()

    def tick(phase: str, force: bool = False) -> None:
        if progress is not None:
            progress.update(ledger, fleet.awake, len(fleet.waiting), phase, force)

    async with Witness(settings.mqtt, settings.gateway.tenant, ledger) as witness:
        try:
            fleet.start(sim.duration_s)
            await _watch(witness, tick, "running", deadline=started + sim.duration_s)
            fleet.stop()
            drain = asyncio.ensure_future(fleet.drain(sim.drain_s))
            await _watch(witness, tick, "draining", until=drain.done)
            await drain
            await _watch(witness, tick, "grace", deadline=loop.time() + sim.grace_s,
                         until=lambda: ledger.acked_undelivered == 0)
        finally:
            fleet.stop()
            await fleet.drain(0)
        tick("done", force=True)
    if progress is not None:
        progress.close()

    elapsed = loop.time() - started
    summary = Summary.from_ledger(
        ledger,
        devices=count,
        profile=sim.profile,
        seed=seed,
        duration_s=sim.duration_s,
        interval_s=sim.interval_s,
        faulty_devices=sum(1 for d in devices if d.fault is not None),
        awake_peak=fleet.awake_peak,
        max_awake=max_awake,
        elapsed_s=round(elapsed, 2),
        sent_per_s=round(ledger.sent / sim.duration_s, 1),
        sim_cpu_s=round(time.process_time() - cpu_at_start, 2),
        sim_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
    if ledger.sent and not (ledger.acked or ledger.rejected_by_code or ledger.service_unavailable
                            or ledger.rate_limited):
        summary.notes.append(f"no answer at all from {target[0]}:{target[1]}: is the gateway running?")
    if summary.lost:
        summary.notes.append("acked reports never reached MQTT within the grace period")
    return summary


async def _watch(
    witness: Witness,
    tick: Callable[[str], None],
    phase: str,
    *,
    deadline: float | None = None,
    until: Callable[[], bool] | None = None,
) -> None:
    """Show progress until `deadline` or `until()`; fail at once if the witness fails."""
    loop = asyncio.get_running_loop()
    while True:
        tick(phase)
        if until is not None and until():
            return
        remaining = TICK_S if deadline is None else min(TICK_S, deadline - loop.time())
        if remaining <= 0:
            return
        done, _ = await asyncio.wait({witness.failed}, timeout=remaining)
        if done:
            witness.failed.result()  # raises WitnessError
            raise WitnessError("the witness stopped")
