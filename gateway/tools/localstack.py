"""Local helper processes for the demo and the benchmarks: mosquitto on a free loopback port,
the gateway as a subprocess, readiness polls, and a process's CPU and peak RSS from /proc.

The daemon never imports it: starting, polling and killing processes is the tooling's job.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.ingest.coap import wire
from gateway.ingest.coap.numbers import CON, EMPTY

LOOPBACK = "127.0.0.1"
# The checkout (or the package's tree under /opt): gateway/ sits beside config/.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = PROJECT_ROOT / "config" / "gateway.toml"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
GATEWAY_STOP_TIMEOUT_S = 60.0  # SIGTERM makes the gateway drain its spool before it exits
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# An empty CON message: a CoAP server answers it with RST (RFC 7252 section 4.3).
COAP_PING = wire.encode(wire.Message(CON, EMPTY, 0x1234))
# For load runs: warnings only, and no per-device rate limit (the load generator sends far
# faster than a sensor would).
LOAD_ENV = {"NBIOT_GATEWAY__LOG_LEVEL": "WARNING", "NBIOT_LIMITS__PER_DEVICE_RATE": "0"}


class StackError(Exception):
    """A helper process did not start, or was not ready in time."""


# -- ports and polls ----------------------------------------------------------------------
# Ports handed out below the kernel's ephemeral range: a port the kernel picked for
# `bind(0)` can be picked again for anyone's outgoing socket (a simulator opens thousands)
# between our close and the gateway's bind; below the range only another `free_port` can
# take it, and it draws at random.
_FIRST_PICKED_PORT = 10_000
_random_ports = random.SystemRandom()  # a process forked after import draws its own
_handed_out: set[int] = set()  # never the same port twice in one process


def _first_ephemeral_port() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A loopback port of `kind` that is free now, outside the ephemeral range when the
    range leaves room below it."""
    low = _first_ephemeral_port()
    for _ in range(100 if low > _FIRST_PICKED_PORT + 1000 else 0):
        port = _random_ports.randrange(_FIRST_PICKED_PORT, low)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOPBACK, 0))
        picked: int = s.getsockname()[1]
        return picked


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `condition` every 50 ms; the seconds it took, or StackError once `timeout_s`
    has passed without it."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise StackError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def tcp_accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.2):
            return True
    except OSError:
        return False


def coap_answers(port: int) -> bool:
    """A CoAP ping answered (by RST) means the server is up."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        s.sendto(COAP_PING, (LOOPBACK, port))
        with contextlib.suppress(OSError):
            return len(s.recv(64)) >= 4
    return False


def http_get(url: str) -> tuple[int, bytes]:
    """(status, body); status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as e:
        return int(e.code), b""
    except OSError:
        return 0, b""


# -- the gateway's HTTP endpoint ----------------------------------------------------------
def gateway_ready(metrics_port: int) -> bool:
    return http_get(f"http://{LOOPBACK}:{metrics_port}/readyz")[0] == 200


def metric_sample(metrics_port: int, sample: str) -> float | None:
    """One sample of /metrics as exposed, e.g. `nbiot_gateway_devices{state="online"}`;
    None when /metrics does not answer or has no such sample."""
    status, body = http_get(f"http://{LOOPBACK}:{metrics_port}/metrics")
    if status != 200:
        return None
    for line in body.decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[1])
    return None


def gateway_metrics(metrics_port: int) -> dict[str, float]:
    """The gateway's unlabelled figures (without the `nbiot_gateway_` prefix), and those
    labelled with a reason as `name{reason}`; empty when /metrics does not answer."""
    status, body = http_get(f"http://{LOOPBACK}:{metrics_port}/metrics")
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


# -- child processes ----------------------------------------------------------------------
@contextlib.contextmanager
def child_process(args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
                  stop_timeout_s: float = STOP_TIMEOUT_S) -> Iterator[subprocess.Popen[bytes]]:
    """A child process with its output in `log_path` and `env` over our environment,
    stopped with SIGTERM (then SIGKILL after `stop_timeout_s`).

    It runs in a session of its own, so a Ctrl-C reaches only us and we stop the children
    in order (the gateway drains into its broker before the broker goes)."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
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


def check_alive(proc: subprocess.Popen[bytes], name: str, log_path: Path) -> None:
    """StackError with the tail of its log if `proc` has exited."""
    if proc.poll() is not None:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise StackError(f"{name} exited with {proc.returncode}:\n{tail}")


def wait_ready(proc: subprocess.Popen[bytes], name: str, log_path: Path,
               ready: Callable[[], bool], what: str | None = None,
               timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll `ready` (waiting for `what`, by default `name`); fail at once, with the log's
    tail, if `proc` exits first."""

    def up() -> bool:
        check_alive(proc, name, log_path)
        return ready()

    wait_until(up, timeout_s, what or name)


# -- mosquitto ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Broker:
    port: int
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def mosquitto(workdir: Path, conf_lines: Sequence[str] = (), name: str = "mosquitto"
              ) -> Iterator[Broker]:
    """mosquitto on a free loopback port, anonymous, no persistence, plus `conf_lines`;
    its config and log are `workdir/{name}.conf` and `.log`. Stopped on exit."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise StackError("mosquitto is not installed (apt-get install mosquitto; ./scripts/demo "
                         "does it for you)")
    port = free_port()
    conf = workdir / f"{name}.conf"
    conf.write_text("\n".join([f"listener {port} {LOOPBACK}", "allow_anonymous true",
                               "persistence false", *conf_lines]) + "\n")
    log = workdir / f"{name}.log"
    with child_process([binary, "-c", str(conf)], log, stop_timeout_s=10) as proc:
        wait_ready(proc, "mosquitto", log, lambda: tcp_accepts(port), f"mosquitto on port {port}")
        yield Broker(port, proc)


# -- the gateway --------------------------------------------------------------------------
def gateway_env(*, broker_port: int, coap_port: int, metrics_port: int, spool: Path,
                registry: Path) -> dict[str, str]:
    """The NBIOT_* overrides that point the shipped config at loopback ports and our files."""
    return {
        "NBIOT_MQTT__HOST": LOOPBACK,
        "NBIOT_MQTT__PORT": str(broker_port),
        "NBIOT_COAP__BIND": LOOPBACK,
        "NBIOT_COAP__PORT": str(coap_port),
        "NBIOT_SPOOL__PATH": str(spool),
        "NBIOT_METRICS__BIND": LOOPBACK,
        "NBIOT_METRICS__PORT": str(metrics_port),
        "NBIOT_REGISTRY__PATH": str(registry),
    }


@contextlib.contextmanager
def gateway(env: Mapping[str, str], log_path: Path, ready: Callable[[], bool],
            what: str = "the gateway", config: Path = SHIPPED_CONFIG,
            timeout_s: float = START_TIMEOUT_S) -> Iterator[subprocess.Popen[bytes]]:
    """`nbiot-gateway run` with `env` over `config`, once `ready()`; SIGTERM on exit."""
    args = [sys.executable, "-m", "gateway", "run", "--config", str(config)]
    with child_process(args, log_path, env, stop_timeout_s=GATEWAY_STOP_TIMEOUT_S) as proc:
        wait_ready(proc, "the gateway", log_path, ready, what, timeout_s)
        yield proc


# -- /proc --------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """`pid` and its live children (a gateway's supervisor and its workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a live process and its live children (OSError once
    it has gone)."""
    total = 0
    for p in process_tree(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLOCK_TICKS


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a live process, plus each live child's (OSError
    once it has gone)."""
    total = 0
    for p in process_tree(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024
