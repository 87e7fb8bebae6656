"""Scale check of the fleet simulator against the real gateway and broker (outside the unit
suite): 40,000 devices, profile steady, a report every 60 s each, for 3 minutes.

Prints lost (must be 0), the gateway's CPU seconds and peak RSS (from /proc), the
simulator's CPU and peak RSS, and mosquitto's, plus a markdown row for
docs/benchmarks.md. Exit 1 if anything acked was lost.

Run: .venv/bin/python benchmarks/sim_scale.py [--devices 40000] [--interval 60] [--duration 180]
It takes the duration plus up to ~1.5 min (drain, grace, start and stop).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.config import load_config
from gateway.tools import localstack
from gateway.tools.demo import start_stack
from gateway.tools.sim.registry_file import make_registry


@dataclass
class ProcStats:
    """CPU seconds and peak RSS of one process, as the kernel counts them."""

    pid: int
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0

    def sample(self) -> None:
        try:
            self.cpu_s = localstack.cpu_s(self.pid)
            self.peak_rss_mb = localstack.peak_rss_mb(self.pid)
        except (OSError, IndexError, ValueError):
            pass  # the process has exited: keep the last sample


def udp_receive_buffer_errors() -> int:
    """Datagrams the kernel dropped because a socket's receive buffer was full (all sockets
    of this network namespace: in this check, that is the gateway's CoAP socket)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
             if line.startswith("Udp:")]
    header, values = lines[0], lines[1]
    return int(values[header.index("RcvbufErrors")])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=40_000)
    parser.add_argument("--interval", type=float, default=60.0)
    parser.add_argument("--duration", type=float, default=180.0)
    parser.add_argument("--profile", default="steady")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    config = localstack.SHIPPED_CONFIG
    settings = load_config(config)
    with tempfile.TemporaryDirectory(prefix="nbiot-scale-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        registry = make_registry(workdir / "devices.csv", args.devices, settings.types,
                                 int(args.interval))
        local = start_stack(config, workdir, registry, stack)
        summary_path = workdir / "summary.json"
        sim = subprocess.Popen(
            [sys.executable, "-m", "gateway", "sim", "--config", str(config),
             "--devices", str(args.devices), "--interval", str(args.interval),
             "--duration", str(args.duration), "--profile", args.profile,
             "--seed", str(args.seed), "--json", str(summary_path)],
            env={**os.environ, **local.env})
        stats = {"gateway": ProcStats(local.gateway.pid), "simulator": ProcStats(sim.pid),
                 "mosquitto": ProcStats(local.broker.proc.pid)}
        started = time.monotonic()
        drops_before = udp_receive_buffer_errors()
        while sim.poll() is None:
            for s in stats.values():
                s.sample()
            time.sleep(1.0)
        elapsed = time.monotonic() - started
        udp_drops = udp_receive_buffer_errors() - drops_before
        stats["gateway"].sample()
        stats["mosquitto"].sample()
        metrics = localstack.gateway_metrics(local.metrics_port)
        stack.close()
        summary = json.loads(summary_path.read_text())

    sim_stats = stats["simulator"]
    sim_stats.cpu_s = max(sim_stats.cpu_s, summary["sim_cpu_s"])
    sim_stats.peak_rss_mb = max(sim_stats.peak_rss_mb, summary["sim_peak_rss_mb"])
    print(f"\n== scale check: {args.devices} devices, {args.profile}, interval {args.interval:g} s, "
          f"{args.duration:g} s window (run {elapsed:.0f} s), python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs")
    print(f"sent {summary['sent']}  acked {summary['acked']}  delivered {summary['delivered']}  "
          f"lost {summary['lost']}  duplicates {summary['duplicates_delivered']}  "
          f"retransmissions {summary['retransmissions']}  rejected {summary['rejected_by_code']}")
    print(f"ack ms {summary['ack_latency_ms']}  delivery ms {summary['delivery_latency_ms']}")
    for name, s in stats.items():
        print(f"{name:<10} CPU {s.cpu_s:7.1f} s ({100 * s.cpu_s / elapsed:4.1f}% of one core)  "
              f"peak RSS {s.peak_rss_mb:6.0f} MB")
    print(f"gateway metrics: accepted {metrics.get('uplinks_accepted_total', 0):.0f}, "
          f"published {metrics.get('mqtt_published_total', 0):.0f}, CoAP retransmissions "
          f"answered from its cache {metrics.get('coap_retransmissions_total', 0):.0f}; "
          f"UDP datagrams dropped by the kernel (receive buffer full) {udp_drops}")
    g, m = stats["gateway"], stats["mosquitto"]
    print("\nmarkdown row:\n"
          f"| {args.devices:,} | {args.profile} | {args.interval:g} s | {args.duration:g} s | "
          f"{summary['sent']:,} | {summary['acked']:,} | {summary['delivered']:,} | "
          f"{summary['lost']} | {summary['duplicates_delivered']} | {g.cpu_s:.0f} s / "
          f"{g.peak_rss_mb:.0f} MB | {sim_stats.cpu_s:.0f} s / {sim_stats.peak_rss_mb:.0f} MB | "
          f"{m.cpu_s:.0f} s / {m.peak_rss_mb:.0f} MB |")
    return 1 if summary["lost"] or sim.returncode else 0


if __name__ == "__main__":
    raise SystemExit(main())
