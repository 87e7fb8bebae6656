"""What grows with gateway hosts, measured: CPU per uplink on each host at 1, 2 and 3 hosts,
the cost of a datagram relayed to its owner, the broker cluster's CPU per uplink, and the
ack latency of each `cluster.ack` mode. Root, Linux; figures only (docs/benchmarks.md,
"Cluster: scale measured and projected").

The cluster as `nbiot-gateway cluster-demo` builds it (gateway/tools/lab/cluster_demo.py's host
configs): network namespaces, the nf_tables balancer on the VIP, gateway hosts (one worker
each), a 3-node RabbitMQ 3.10 cluster with the uplink quorum queue. The load is
gateway/tools/bench/openload.py in the device namespace against the VIP: open loop, paced, a
fresh UDP socket (source port) per uplink, RFC 7252 retransmission. Each step starts its
hosts afresh (empty spool and state), sends every device once unmeasured (a known device
costs less than a first uplink), idles `IDLE_S` (the hosts' CPU with no load: heartbeats,
balancer probes), then runs `--rate` for `--duration` seconds, waits for every spool to be
published, and reads each host's /proc/<pid>/stat and /metrics, and the CPU of every
process in the broker namespaces.

Steps:
  1 host                  h1 alone, cluster off: the single-host gateway behind the balancer
  1 host at 1/2, 1/3 rate the same at the load one host of 2 or 3 gets (per-uplink CPU
                          falls as the rate rises: loop wake-ups and commits are shared)
  2 hosts, 3 hosts        the cluster, cluster.ack = disk; the balancer spreads datagrams
                          by source address and port, so (N-1)/N arrive at a non-owner
  relay h1 -> h2          2 hosts, the balancer sends everything to h1, and the fleet is
                          only the devices h2 owns (rendezvous over h1, h2): h1 does nothing
                          but relay (F out, R back), h2 nothing but own relayed datagrams
  3 hosts, broker ack     cluster.ack = broker: 2.04 after the quorum queue's PUBACK

Run: flock /tmp/nbg-heavy.lock .venv/bin/python benchmarks/cluster_scale.py
     [--devices 12000 --rate 600 --duration 40 --json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gateway.cluster.membership import rank
from gateway.tools.balancer import Backend
from gateway.tools.bench.fleet import KEPT_UP_LAG_P99_S, OpenLoopRun
from gateway.tools.bench.loadgen import bench_device_id, write_bench_registry
from gateway.tools.bench.openload import LoadResult
from gateway.tools.bench.probe import bucket_quantile_s
from gateway.tools.bench.runner import machine
from gateway.tools.bench.witness import SEQ_SPAN
from gateway.tools.lab.balancer import lab_balancer
from gateway.tools.lab.cluster_demo import (
    METRICS_PORT,
    UPLINK_BINDING,
    UPLINK_QUEUE,
    DemoFailed,
    host_config,
    scrape,
    tail,
)
from gateway.tools.lab.netns import Lab
from gateway.tools.lab.rabbit import RabbitCluster
from gateway.tools.localstack import CLOCK_TICKS, LOAD_ENV, cpu_s, wait_until

PREFIX, NET = "nbsc", 61
NS = "nbiot_gateway_"
WARMUP_RATE_PER_S = 1500.0
IDLE_S = 8.0
READY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 60.0
QUEUE_SETTLE_S = 15.0  # the management API's queue depth lags a tick or more


@dataclass(frozen=True)
class Step:
    name: str
    hosts: int  # h1..hN run; 1: cluster off (the single-host gateway)
    rate_share: float = 1.0  # of --rate
    ack: str = "disk"
    backends: int | None = None  # the first N hosts behind the balancer (None: all)
    owner: str | None = None  # the fleet is only the devices this host owns


STEPS = (
    Step("1 host", 1),
    Step("1 host, 1/2 rate", 1, 1 / 2),
    Step("1 host, 1/3 rate", 1, 1 / 3),
    Step("2 hosts", 2),
    Step("3 hosts", 3),
    Step("relay h1 -> h2", 2, backends=1, owner="h2"),
    Step("3 hosts, broker ack", 3, ack="broker"),
)


@dataclass
class Reading:
    """One host (or the broker nodes) at one moment."""

    cpu_s: float
    metrics: dict[str, float]
    at: float = field(default_factory=time.monotonic)

    def get(self, name: str) -> float:
        return self.metrics.get(NS + name, 0.0)

    def ack_buckets(self) -> dict[float, float]:
        prefix = NS + 'uplink_ack_seconds_bucket{le="'
        return {float(k[len(prefix):-2]): v for k, v in self.metrics.items()
                if k.startswith(prefix)}


@dataclass
class HostFigures:
    host: str
    cpu_s: float
    idle_ms_per_s: float  # CPU with no load, before the run
    from_devices: int  # datagrams from the balancer: handled here or forwarded
    accepted: int  # uplinks this host owned and answered 2.04
    forwarded: int  # datagrams sent on to their owner (F; its reply R comes back here)
    relayed_in: int  # datagrams another host forwarded here, handled as owner

    @property
    def us_per_accepted(self) -> float | None:
        return self.cpu_s / self.accepted * 1e6 if self.accepted else None

    @property
    def us_per_datagram(self) -> float | None:
        return self.cpu_s / self.from_devices * 1e6 if self.from_devices else None


@dataclass
class StepResult:
    step: Step
    offered_per_s: float
    devices: int
    hosts: list[HostFigures]
    broker_cpu_s: float  # every process in the broker namespaces, over the run
    broker_idle_ms_per_s: float  # the same with no load, before the run
    window_s: float  # from the run's first reading to its last (spools published)
    sent: int
    acked: int
    unanswered: int
    late: int
    codes: dict[str, int]
    kept_up: bool
    lag_p99_ms: float
    device_p50_ms: float
    device_p99_ms: float
    gw_ack_p50_ms: float
    gw_ack_p99_ms: float
    queued: int  # in the uplink queue after the step (warm-up included), then purged
    expected_in_queue: int  # uplinks the hosts accepted, warm-up included
    load_before: str = ""
    load_after: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return sum(h.accepted for h in self.hosts)

    @property
    def cpu_us_per_uplink(self) -> float:
        """All hosts' CPU over all uplinks accepted: the cluster's cost of one uplink."""
        return sum(h.cpu_s for h in self.hosts) / self.accepted * 1e6 if self.accepted else 0.0

    @property
    def broker_us_per_uplink(self) -> float:
        return self.broker_cpu_s / self.accepted * 1e6 if self.accepted else 0.0

    @property
    def broker_net_us_per_uplink(self) -> float:
        """Less what the nodes spend idle (statistics, Raft ticks, distribution)."""
        busy = self.broker_cpu_s - self.broker_idle_ms_per_s / 1000 * self.window_s
        return busy / self.accepted * 1e6 if self.accepted else 0.0


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def namespace_cpu_s(lab: Lab, ns: str) -> float:
    """CPU seconds of every live process in namespace `ns` (RabbitMQ: beam.smp, epmd...)."""
    pids = subprocess.run(["ip", "netns", "pids", lab.netns(ns)], capture_output=True,
                          text=True, timeout=10).stdout.split()
    ticks = 0
    for pid in pids:  # each process's own utime + stime: the namespace lists its children too
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def kept_up(load: LoadResult) -> bool:
    """As the fleet bench judges it: the schedule sent whole and on time."""
    return (load.unsent == 0 and load.achieved_per_s >= 0.99 * load.rate_per_s
            and load.lag.quantile_s(0.99) <= KEPT_UP_LAG_P99_S)


class ScaleBench:
    def __init__(self, lab: Lab, rabbit: RabbitCluster, devices: int, rate: float,
                 duration_s: float, workdir: Path) -> None:
        self.lab, self.rabbit = lab, rabbit
        self.devices, self.rate, self.duration_s = devices, rate, duration_s
        self.workdir = workdir
        self.secret = secrets.token_hex(16)
        self.wrap = ["ip", "netns", "exec", lab.netns("dev")]

    def run(self, index: int, step: Step) -> StepResult:
        lab = self.lab
        d = self.workdir / f"step{index}"
        d.mkdir()
        write_bench_registry(d / "devices.csv", self.devices, report_interval_s=3600)
        hosts = lab.hosts[:step.hosts]
        ids_path: Path | None = None
        devices = self.devices
        if step.owner is not None:
            ids = [i for i in range(self.devices) if rank(bench_device_id(i), hosts)[0] == step.owner]
            ids_path = d / "ids.txt"
            ids_path.write_text("".join(f"{i}\n" for i in ids))
            devices = len(ids)
        procs: dict[str, subprocess.Popen[bytes]] = {}
        load_before = loadavg()
        try:
            for h in hosts:
                (d / h).mkdir()
                config = host_config(lab, self.rabbit, h, step.ack, self.secret, d, hosts)
                env = {**LOAD_ENV, "NBIOT_GATEWAY__WORKERS": "1"}
                if len(hosts) == 1:
                    env["NBIOT_CLUSTER__ENABLED"] = "false"
                procs[h] = lab.popen(h, [sys.executable, "-m", "gateway", "run", "--config",
                                         str(config)], env=env, log=d / f"{h}.log")

            def ready(h: str) -> bool:
                if procs[h].poll() is not None:
                    raise DemoFailed(f"gateway {h} exited {procs[h].returncode}: "
                                     f"{tail(d / f'{h}.log')}")
                m = scrape(lab.backbone_ip(h), METRICS_PORT)
                hearing = len(hosts) == 1 or m.get(NS + "cluster_hosts_alive") == len(hosts)
                return m.get(NS + "mqtt_connected") == 1 and hearing

            wait_until(lambda: all(ready(h) for h in hosts), READY_TIMEOUT_S,
                       f"{step.name}: every host connected and hearing its peers")
            behind = hosts[:step.backends or len(hosts)]
            backends = [Backend(h, lab.backbone_ip(h)) for h in behind]
            with lab_balancer(lab, backends) as balancer:
                balancer.wait_for(set(behind))
                return self._measure(step, d, hosts, procs, devices, ids_path, load_before)
        finally:
            for proc in procs.values():
                lab.stop(proc)

    def _read(self, hosts: list[str], procs: dict[str, subprocess.Popen[bytes]]
              ) -> dict[str, Reading]:
        lab = self.lab
        out = {h: Reading(cpu_s(procs[h].pid), scrape(lab.backbone_ip(h), METRICS_PORT))
               for h in hosts}
        out["broker"] = Reading(sum(namespace_cpu_s(lab, b) for b in lab.brokers), {})
        return out

    def _drained(self, hosts: list[str]) -> None:
        wait_until(lambda: all(scrape(self.lab.backbone_ip(h), METRICS_PORT).get(
            NS + "spool_records", 1) == 0 for h in hosts), DRAIN_TIMEOUT_S, "spools published")

    def _load(self, d: Path, name: str, devices: int, rate: float, duration_s: float,
              seq_base: int, ids_path: Path | None) -> LoadResult:
        run = OpenLoopRun(self.lab.vip_port, devices, rate, duration_s, seq_base, 1,
                          d / f"openload-{name}.log", host=self.lab.vip, wrap=self.wrap,
                          device_ids=ids_path)
        try:
            return run.result()
        finally:
            run.stop()

    def _measure(self, step: Step, d: Path, hosts: list[str],
                 procs: dict[str, subprocess.Popen[bytes]], devices: int,
                 ids_path: Path | None, load_before: str) -> StepResult:
        rate = self.rate * step.rate_share
        warm = self._load(d, "warmup", devices, WARMUP_RATE_PER_S, devices / WARMUP_RATE_PER_S,
                          0, ids_path)
        self._drained(hosts)
        idle_from = self._read(hosts, procs)
        time.sleep(IDLE_S)
        before = self._read(hosts, procs)
        load = self._load(d, "run", devices, rate, self.duration_s, SEQ_SPAN, ids_path)
        self._drained(hosts)
        after = self._read(hosts, procs)
        figures = []
        buckets_before: dict[float, float] = {}
        buckets_after: dict[float, float] = {}
        for h in hosts:
            b, a = before[h], after[h]

            def delta(name: str, a: Reading = a, b: Reading = b) -> int:
                return int(a.get(name) - b.get(name))

            relayed_in = delta("cluster_relayed_datagrams_total")
            forwarded = delta("cluster_forwarded_datagrams_total")
            received = delta("uplinks_received_total")
            figures.append(HostFigures(
                host=h, cpu_s=round(a.cpu_s - b.cpu_s, 3),
                idle_ms_per_s=round((b.cpu_s - idle_from[h].cpu_s) / IDLE_S * 1000, 2),
                from_devices=received - relayed_in + forwarded,
                accepted=delta("uplinks_accepted_total"), forwarded=forwarded,
                relayed_in=relayed_in))
            for bound, count in b.ack_buckets().items():
                buckets_before[bound] = buckets_before.get(bound, 0.0) + count
            for bound, count in a.ack_buckets().items():
                buckets_after[bound] = buckets_after.get(bound, 0.0) + count
        expected = int(sum(after[h].get("uplinks_accepted_total") for h in hosts))
        queued = self._queued(expected)
        self.rabbit.purge_queue(UPLINK_QUEUE)
        return StepResult(
            step=step, offered_per_s=round(rate, 1), devices=devices, hosts=figures,
            broker_cpu_s=round(after["broker"].cpu_s - before["broker"].cpu_s, 3),
            broker_idle_ms_per_s=round(
                (before["broker"].cpu_s - idle_from["broker"].cpu_s) / IDLE_S * 1000, 1),
            window_s=round(after["broker"].at - before["broker"].at, 2),
            sent=load.sent, acked=len(load.acked), unanswered=load.unanswered + load.unsent,
            late=load.late, codes=load.codes, kept_up=kept_up(load),
            lag_p99_ms=ms(load.lag.quantile_s(0.99)),
            device_p50_ms=ms(load.latency.quantile_s(0.5)),
            device_p99_ms=ms(load.latency.quantile_s(0.99)),
            gw_ack_p50_ms=ms(bucket_quantile_s(buckets_before, buckets_after, 0.5)),
            gw_ack_p99_ms=ms(bucket_quantile_s(buckets_before, buckets_after, 0.99)),
            queued=queued, expected_in_queue=expected, load_before=load_before,
            load_after=loadavg(), extra={
                "warmup_acked": len(warm.acked), "warmup_unanswered": warm.unanswered + warm.unsent})

    def _queued(self, expected: int) -> int:
        deadline = time.monotonic() + QUEUE_SETTLE_S
        depth = self.rabbit.queue_depth(UPLINK_QUEUE)
        while depth < expected and time.monotonic() < deadline:
            time.sleep(0.5)
            depth = self.rabbit.queue_depth(UPLINK_QUEUE)
        return depth


def ms(value_s: float) -> float:
    return round(value_s * 1000, 1) if math.isfinite(value_s) else math.inf


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def table(head: str, rows: list[str]) -> None:
    print("\n".join([head, "-" * len(head), *rows]) + "\n")


def print_tables(results: list[StepResult]) -> None:
    table(f"{'step':<22}{'host':<6}{'from devices':>13}{'accepted':>10}{'forwarded':>11}"
          f"{'relayed in':>12}{'cpu s':>8}{'us/accepted':>13}{'us/datagram':>13}"
          f"{'idle ms/s':>11}",
          [f"{r.step.name if i == 0 else '':<22}{h.host:<6}{h.from_devices:>13,}"
           f"{h.accepted:>10,}{h.forwarded:>11,}{h.relayed_in:>12,}{h.cpu_s:>8.2f}"
           f"{fmt(h.us_per_accepted):>13}{fmt(h.us_per_datagram):>13}{h.idle_ms_per_s:>11.1f}"
           for r in results for i, h in enumerate(r.hosts)])
    table(f"{'step':<22}{'offered/s':>10}{'devices':>9}{'sent':>8}{'acked':>8}"
          f"{'unansw.':>8}{'late':>6}{'kept up':>8}{'cluster us/up':>14}"
          f"{'broker us/up':>13}{'(net)':>7}{'gw ack p50/p99 ms':>19}{'device p50/p99 ms':>19}"
          f"{'queue/accepted':>16}  load before -> after",
          [f"{r.step.name:<22}{r.offered_per_s:>10,.0f}{r.devices:>9,}{r.sent:>8,}"
           f"{r.acked:>8,}{r.unanswered:>8,}{r.late:>6,}{'yes' if r.kept_up else 'NO':>8}"
           f"{r.cpu_us_per_uplink:>14,.0f}{r.broker_us_per_uplink:>13,.0f}"
           f"{r.broker_net_us_per_uplink:>7,.0f}"
           f"{f'{r.gw_ack_p50_ms:g} / {r.gw_ack_p99_ms:g}':>19}"
           f"{f'{r.device_p50_ms:g} / {r.device_p99_ms:g}':>19}"
           f"{f'{r.queued:,}/{r.expected_in_queue:,}':>16}"
           f"  {r.load_before} -> {r.load_after}" for r in results])


def ratios(results: list[StepResult]) -> dict[str, float]:
    """The forwarding cost and the growth with hosts, from the steps that ran."""
    by = {r.step.name: r for r in results}
    out: dict[str, float] = {}

    def us(name: str, host: str, per: str) -> float | None:
        r = by.get(name)
        figures = next((h for h in r.hosts if h.host == host), None) if r else None
        if figures is None:
            return None
        count = getattr(figures, per)
        return figures.cpu_s / count * 1e6 if count else None

    local = us("1 host", "h1", "accepted")
    relay = us("relay h1 -> h2", "h1", "forwarded")
    owner = us("relay h1 -> h2", "h2", "relayed_in")
    if local and relay and owner:
        out["relay us per forwarded datagram (h1: F out + R back)"] = round(relay, 1)
        out["owner us per relayed-in datagram (h2)"] = round(owner, 1)
        out["local us per uplink (1 host, same rate)"] = round(local, 1)
        out["relay / local"] = round(relay / local, 2)
        out["owner of a relayed datagram / local"] = round(owner / local, 2)
        out["relayed uplink (relay + owner) / local"] = round((relay + owner) / local, 2)
    for n, single in ((2, "1 host, 1/2 rate"), (3, "1 host, 1/3 rate")):
        cluster, alone = by.get(f"{n} hosts"), by.get(single)
        if cluster and alone and alone.cpu_us_per_uplink:
            out[f"{n} hosts cluster us/uplink / 1 host at the same per-host rate"] = round(
                cluster.cpu_us_per_uplink / alone.cpu_us_per_uplink, 2)
        if cluster and local:
            out[f"{n} hosts cluster us/uplink / 1 host at the full rate"] = round(
                cluster.cpu_us_per_uplink / local, 2)
    disk, broker = by.get("3 hosts"), by.get("3 hosts, broker ack")
    if disk and broker and disk.cpu_us_per_uplink:
        out["3 hosts broker ack / disk ack, cluster us/uplink"] = round(
            broker.cpu_us_per_uplink / disk.cpu_us_per_uplink, 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=12_000)
    parser.add_argument("--rate", type=float, default=600.0, help="uplinks/s, all hosts")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds per step")
    parser.add_argument("--steps", default="", help="comma-separated step numbers (1-based; "
                        "default: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    chosen = [int(s) for s in args.steps.split(",") if s] or range(1, len(STEPS) + 1)
    steps = [STEPS[i - 1] for i in chosen]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = loadavg()
    results: list[StepResult] = []
    workdir = Path(tempfile.mkdtemp(prefix="nbiot-bench-scale-"))
    try:
        with (Lab(PREFIX, hosts=3, brokers=3, net=NET, workdir=workdir / "lab") as lab,
              RabbitCluster(lab, 3) as rabbit):
            rabbit.declare_uplink_queue(UPLINK_QUEUE, UPLINK_BINDING)
            bench = ScaleBench(lab, rabbit, args.devices, args.rate, args.duration, workdir)
            for n, step in zip(chosen, steps, strict=True):
                print(f"step {n}: {step.name} ...", file=sys.stderr, flush=True)
                results.append(bench.run(n, step))
    except BaseException:
        print(f"cluster_scale failed: logs in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ncluster_scale: {args.devices:,} devices, open loop at {args.rate:g} uplinks/s "
          f"in all ({args.duration:g} s per step; fresh UDP socket per uplink), through the "
          "nf_tables VIP; 1 worker per host; 3-node RabbitMQ 3.10, quorum queue; "
          "cluster.ack = disk unless named")
    print(f"machine: {machine()}; {started}; load average {load_start} at the start, "
          f"{loadavg()} at the end\n")
    print_tables(results)
    found = ratios(results)
    print("\n".join(f"{k}: {v}" for k, v in found.items()))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "machine": machine(), "started": started, "devices": args.devices,
            "rate": args.rate, "duration_s": args.duration, "ratios": found,
            "steps": [{**asdict(r), "cpu_us_per_uplink": r.cpu_us_per_uplink,
                       "broker_us_per_uplink": r.broker_us_per_uplink,
                       "broker_net_us_per_uplink": r.broker_net_us_per_uplink}
                      for r in results]},
            indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
