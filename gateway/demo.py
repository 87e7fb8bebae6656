"""`nbiot-gateway demo`: the main job in one command. A temporary mosquitto and gateway on
loopback ports of their own, a simulated fleet with the live display, a summary with the
gateway's own metrics, then a clean stop (SIGTERM, wait) of everything it started.

It never touches the shipped config, spool or registry: everything lives in a temp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# 10,000 devices every 5 s is ~2,000 uplinks/s: half of what this 2-core machine carried
# cleanly with the gateway, mosquitto and the simulator all on it (3,250/s; at 4,700/s the
# simulator's own core saturates and delivery latency climbs), see docs/benchmarks.md.
DEFAULT_DEVICES = 10_000
DEFAULT_DURATION_S = 60.0
DEFAULT_INTERVAL_S = 5.0
SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "config" / "gateway.toml"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0
DEMO_DRAIN_S = 15.0  # a demo ends within a minute or so; a longer straggler is "unfinished"


class DemoError(Exception):
    """Something the demo needs did not start."""


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as e:
        return int(e.code), b""
    except OSError:
        return 0, b""


@contextlib.contextmanager
def _process(args: list[str], log_path: Path, env: dict[str, str] | None = None,
             stop_timeout_s: float = STOP_TIMEOUT_S) -> Iterator[subprocess.Popen[bytes]]:
    """A child process with its output in `log_path`, stopped with SIGTERM (then SIGKILL)."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _alive(proc: subprocess.Popen[bytes], name: str, log_path: Path) -> None:
    if proc.poll() is not None:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise DemoError(f"{name} exited with {proc.returncode}:\n{tail}")


@dataclass(frozen=True)
class Broker:
    port: int
    proc: subprocess.Popen[bytes]


def start_broker(workdir: Path, stack: contextlib.ExitStack) -> Broker:
    """mosquitto on a free loopback port, stopped when `stack` closes."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise DemoError("mosquitto is not installed (apt-get install mosquitto; ./scripts/demo "
                        "does it for you)")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    # Unlimited queues: the simulator's witness must see every message, however busy.
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 1000000\nmax_inflight_messages 0\n")
    log = workdir / "mosquitto.log"
    proc = stack.enter_context(_process([binary, "-c", str(conf)], log, stop_timeout_s=10))

    def up() -> bool:
        _alive(proc, "mosquitto", log)
        return _accepting(port)

    wait_until(up, START_TIMEOUT_S, f"mosquitto on port {port}")
    return Broker(port, proc)


def gateway_env(workdir: Path, broker_port: int, coap_port: int, metrics_port: int,
                registry: Path) -> dict[str, str]:
    """The shipped config, pointed at the demo's ports and files through the environment."""
    return {
        "NBIOT_MQTT__HOST": "127.0.0.1",
        "NBIOT_MQTT__PORT": str(broker_port),
        "NBIOT_COAP__BIND": "127.0.0.1",
        "NBIOT_COAP__PORT": str(coap_port),
        "NBIOT_SPOOL__PATH": str(workdir / "spool.sqlite"),
        "NBIOT_METRICS__BIND": "127.0.0.1",
        "NBIOT_METRICS__PORT": str(metrics_port),
        "NBIOT_REGISTRY__PATH": str(registry),
    }


def start_gateway(config: Path, env: dict[str, str], workdir: Path, metrics_port: int,
                  stack: contextlib.ExitStack) -> subprocess.Popen[bytes]:
    log = workdir / "gateway.log"
    proc = stack.enter_context(_process(
        [sys.executable, "-m", "gateway", "run", "--config", str(config)], log,
        env={**os.environ, **env}))

    def ready() -> bool:
        _alive(proc, "the gateway", log)
        return _http_get(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 200

    wait_until(ready, START_TIMEOUT_S, "the gateway to be ready (/readyz)")
    return proc


def gateway_metrics(metrics_port: int) -> dict[str, float]:
    """A few of the gateway's own figures from /metrics, for the summary."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = _http_get(f"http://127.0.0.1:{metrics_port}/metrics")
    if status != 200:
        return {}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            name = sample.name.removeprefix("nbiot_gateway_")
            if sample.labels.get("reason"):
                name = f"{name}{{{sample.labels['reason']}}}"
            elif sample.labels:
                continue
            values[name] = float(sample.value)
    return values


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
             profile: str = "steady", seed: int | None = None, json_path: Path | None = None) -> int:
    from gateway.config import load_config
    from gateway.errors import ConfigError
    from gateway.registry import load_registry
    from gateway.sim.command import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_LOST, finish, sim_section
    from gateway.sim.progress import Progress
    from gateway.sim.registry_file import make_registry
    from gateway.sim.run import simulate
    from gateway.sim.witness import WitnessError

    config = (config or SHIPPED_CONFIG).resolve()
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
            broker_port = start_broker(workdir, stack).port
            coap_port, metrics_port = free_port(socket.SOCK_DGRAM), free_port()
            env = gateway_env(workdir, broker_port, coap_port, metrics_port, registry_path)
            gateway = start_gateway(config, env, workdir, metrics_port, stack)
            print(f"demo: mosquitto on 127.0.0.1:{broker_port}, gateway coap://127.0.0.1:{coap_port} "
                  f"(metrics http://127.0.0.1:{metrics_port}/metrics), pid {gateway.pid}",
                  file=sys.stderr)
            demo_settings = settings.model_copy(update={
                "coap": settings.coap.model_copy(update={"port": coap_port}),
                "mqtt": settings.mqtt.model_copy(update={"host": "127.0.0.1", "port": broker_port}),
            })
            sim = sim_section(settings.sim, {
                "devices": devices, "interval_s": interval_s, "duration_s": duration_s,
                "profile": profile, "seed": seed, "host": "127.0.0.1", "port": coap_port,
                "drain_s": min(settings.sim.drain_s, DEMO_DRAIN_S)})
            registry = load_registry(registry_path, settings.types)
            summary = asyncio.run(simulate(demo_settings, registry, sim, Progress()))
            metrics = gateway_metrics(metrics_port)
        except KeyboardInterrupt:
            print("\ndemo interrupted: stopping the gateway and the broker", file=sys.stderr)
            return EXIT_INTERRUPTED
        except (DemoError, ConfigError, WitnessError) as e:
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
