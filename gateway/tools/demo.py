"""`nbiot-gateway demo`: the main job in one command. A temporary mosquitto and gateway on
loopback ports of their own, a simulated fleet with the live display, a summary with the
gateway's own metrics, then a clean stop (SIGTERM, wait) of everything it started.

It never touches the shipped config, spool or registry: everything lives in a temp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gateway.tools import localstack
from gateway.tools.localstack import StackError

# 10,000 devices every 5 s is ~2,000 uplinks/s: half of what this 2-core machine carried
# cleanly with the gateway, mosquitto and the simulator all on it (3,250/s; at 4,700/s the
# simulator's own core saturates and delivery latency climbs), see docs/benchmarks.md.
DEFAULT_DEVICES = 10_000
DEFAULT_DURATION_S = 60.0
DEFAULT_INTERVAL_S = 5.0
# A fifth of the fleet speaks LwM2M (half the climate sensors, the type that maps its
# fields to IPSO resources): queue mode, Send on /dp, the gateway's requests answered.
DEFAULT_LWM2M_SHARE = 0.2
DEMO_DRAIN_S = 15.0  # a demo ends within a minute or so; a longer straggler is "unfinished"
# Unlimited queues: the simulator's witness must see every message, however busy.
MOSQUITTO_CONF = ("max_queued_messages 1000000", "max_inflight_messages 0")

DemoError = StackError  # something the demo needs did not start


@dataclass(frozen=True)
class DemoStack:
    broker: localstack.Broker
    gateway: subprocess.Popen[bytes]
    coap_port: int
    metrics_port: int
    env: dict[str, str]  # the gateway's NBIOT_* overrides: a simulator given them finds it


def start_stack(config: Path, workdir: Path, registry: Path,
                stack: contextlib.ExitStack, *, lwm2m: bool = False) -> DemoStack:
    """mosquitto and the gateway (`config` pointed at `workdir` and loopback ports of their
    own), the gateway ready (/readyz); both stopped when `stack` closes. With `lwm2m`, the
    gateway serves LwM2M too, NoSec allowed: it listens on loopback only."""
    broker = stack.enter_context(localstack.mosquitto(workdir, MOSQUITTO_CONF))
    coap_port, metrics_port = localstack.free_port(socket.SOCK_DGRAM), localstack.free_port()
    env = localstack.gateway_env(broker_port=broker.port, coap_port=coap_port,
                                 metrics_port=metrics_port, spool=workdir / "spool.sqlite",
                                 registry=registry)
    if lwm2m:
        env |= {"NBIOT_LWM2M__ENABLED": "true", "NBIOT_LWM2M__ALLOW_NOSEC": "true"}
    gateway = stack.enter_context(localstack.gateway(
        env, workdir / "gateway.log", lambda: localstack.gateway_ready(metrics_port),
        "the gateway to be ready (/readyz)", config))
    return DemoStack(broker, gateway, coap_port, metrics_port, env)


def format_gateway_metrics(m: dict[str, float]) -> str:
    if not m:
        return "gateway metrics: /metrics did not answer"
    rejected = "  ".join(f"{k.split('{')[1][:-1]}: {v:.0f}" for k, v in m.items()
                         if k.startswith("uplinks_rejected_total{")) or "-"
    ack_mean_ms = 1000 * m.get("uplink_ack_seconds_sum", 0) / max(1, m.get("uplink_ack_seconds_count", 0))
    rows = [
        ("received", f"{m.get('uplinks_received_total', 0):.0f} uplinks, "
                     f"{m.get('coap_retransmissions_total', 0):.0f} CoAP retransmissions answered "
                     f"from the reply cache"),
        ("accepted", f"{m.get('uplinks_accepted_total', 0):.0f} (2.04 once durable, mean "
                     f"{ack_mean_ms:.1f} ms), {m.get('uplinks_duplicate_total', 0):.0f} duplicates "
                     f"not forwarded again"),
        ("rejected", rejected),
        ("published", f"{m.get('mqtt_published_total', 0):.0f} to MQTT, "
                      f"{m.get('spool_records', 0):.0f} still spooled"),
        ("process", f"{m.get('process_cpu_seconds_total', 0):.1f} s CPU, RSS "
                    f"{m.get('process_resident_memory_bytes', 0) / 2**20:.0f} MB"),
    ]
    width = max(len(n) for n, _ in rows)
    return "gateway (from its /metrics):\n" + "\n".join(f"  {n:<{width}}  {v}" for n, v in rows)


def run_demo(config: Path | None, *, devices: int, duration_s: float, interval_s: float,
             profile: str = "steady", seed: int | None = None, json_path: Path | None = None,
             processes: int | None = None, lwm2m_share: float = DEFAULT_LWM2M_SHARE) -> int:
    from gateway.config import load_config
    from gateway.errors import ConfigError
    from gateway.pipeline.registry import load_registry
    from gateway.tools.sim.command import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_LOST, finish, sim_section
    from gateway.tools.sim.processes import SimulatorError
    from gateway.tools.sim.progress import Progress
    from gateway.tools.sim.registry_file import make_registry
    from gateway.tools.sim.run import simulate

    config = (config or localstack.SHIPPED_CONFIG).resolve()
    try:
        settings = load_config(config)
    except ConfigError as e:
        print(f"{config}: configuration is invalid:\n  " + "\n  ".join(e.problems), file=sys.stderr)
        return EXIT_CONFIG
    with tempfile.TemporaryDirectory(prefix="nbiot-demo-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        try:
            registry_path = make_registry(workdir / "devices.csv", devices, settings.types,
                                          max(1, round(interval_s)))
            print(f"demo: {devices} devices, a report every {interval_s:g} s each "
                  f"(~{devices / interval_s:.0f}/s), for {duration_s:g} s; profile {profile}",
                  file=sys.stderr)
            local = start_stack(config, workdir, registry_path, stack, lwm2m=lwm2m_share > 0)
            broker_port, coap_port, metrics_port = (local.broker.port, local.coap_port,
                                                    local.metrics_port)
            gateway = local.gateway
            print(f"demo: mosquitto on 127.0.0.1:{broker_port}, gateway coap://127.0.0.1:{coap_port} "
                  f"(metrics http://127.0.0.1:{metrics_port}/metrics), pid {gateway.pid}",
                  file=sys.stderr)
            demo_settings = settings.model_copy(update={
                "coap": settings.coap.model_copy(update={"port": coap_port}),
                "mqtt": settings.mqtt.model_copy(update={"host": "127.0.0.1", "port": broker_port}),
                "metrics": settings.metrics.model_copy(update={
                    "enabled": True, "bind": "127.0.0.1", "port": metrics_port}),
                "lwm2m": settings.lwm2m.model_copy(update={
                    "enabled": lwm2m_share > 0, "allow_nosec": lwm2m_share > 0}),
            })
            sim = sim_section(settings.sim, {
                "devices": devices, "interval_s": interval_s, "duration_s": duration_s,
                "profile": profile, "seed": seed, "host": "127.0.0.1", "port": coap_port,
                "processes": processes, "lwm2m_share": lwm2m_share,
                "drain_s": min(settings.sim.drain_s, DEMO_DRAIN_S)})
            registry = load_registry(registry_path, settings.types)
            summary = asyncio.run(simulate(demo_settings, registry, sim, Progress()))
            metrics = localstack.gateway_metrics(metrics_port)
        except KeyboardInterrupt:
            print("\ndemo interrupted: stopping the gateway and the broker", file=sys.stderr)
            return EXIT_INTERRUPTED
        except (DemoError, ConfigError, SimulatorError) as e:
            problems = e.problems if isinstance(e, ConfigError) else [str(e)]
            print("demo failed: " + "\n  ".join(problems), file=sys.stderr)
            return EXIT_LOST
        code = finish(summary, json_path)
        print(format_gateway_metrics(metrics))
        stack.close()  # SIGTERM: the gateway drains its spool and exits 0
        if gateway.returncode != 0:
            print(f"demo: the gateway exited with {gateway.returncode} "
                  f"(log: {workdir / 'gateway.log'})", file=sys.stderr)
            print((workdir / "gateway.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            return EXIT_LOST
        print("demo: broker and gateway stopped cleanly", file=sys.stderr)
        return code
