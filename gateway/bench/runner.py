"""`nbiot-gateway bench`: one load generator, four servers, measured side by side in one run.

1. the gateway end to end (spool on disk, real mosquitto, QoS 1, every ack checked delivered)
2. a bare aiocoap server (root resource answering 2.04)
3. libcoap's coap-server-notls (dynamic resources accept PUT)
4. the gateway with no broker (ingest into the spool alone)
then the gateway again at half its maximum rate, for the latency at a sane load.
Prints a table and ratios; `--json FILE` writes them. It asserts nothing: figures only.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.bench.loadgen import bench_device_id, write_bench_registry

ROOT_CONFIG = Path(__file__).resolve().parent.parent.parent / "config" / "gateway.toml"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    target: str
    uplinks_per_s: float = 0.0
    ack_p50_ms: float = 0.0
    ack_p99_ms: float = 0.0
    answered: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    retransmissions: int = 0
    server_cpu_s_per_1000: float = 0.0
    server_peak_rss_mb: float = 0.0
    delivered: int | None = None
    lost: int | None = None
    note: str = ""


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench: timed out waiting for {what}")
        time.sleep(0.05)


def udp_answers(port: int) -> bool:
    """A CoAP ping (empty CON) answered by RST means the server is up."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        s.sendto(b"\x40\x00\x12\x34", ("127.0.0.1", port))
        with contextlib.suppress(OSError):
            return len(s.recv(64)) >= 4
    return False


def tcp_answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


@contextlib.contextmanager
def process(args: list[str], log: Path, env: dict[str, str] | None = None
             ) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def loadgen(port: int, devices: int, duration_s: float, method: str = "POST",
            rate: float | None = None, first_device: int = 0) -> dict[str, Any]:
    args = [sys.executable, "-m", "gateway.bench.loadgen", "--port", str(port),
            "--devices", str(devices), "--duration", str(duration_s), "--method", method,
            "--first-device", str(first_device)]
    if rate:
        args += ["--rate", str(rate)]
    done = subprocess.run(args, capture_output=True, check=True, timeout=duration_s + 120)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def measure(target: str, pid: int, port: int, devices: int, duration_s: float,
             method: str = "POST", rate: float | None = None) -> tuple[Result, dict[str, Any]]:
    cpu_before = cpu_s(pid)
    load = loadgen(port, devices, duration_s, method, rate)
    cpu = cpu_s(pid) - cpu_before
    answered = load["answered"]
    result = Result(
        target=target,
        uplinks_per_s=load["rate_per_s"],
        ack_p50_ms=load["ack_latency_ms"]["p50"],
        ack_p99_ms=load["ack_latency_ms"]["p99"],
        answered=answered,
        codes=load["codes"],
        retransmissions=load["retransmissions"],
        server_cpu_s_per_1000=round(cpu / answered * 1000, 4) if answered else 0.0,
        server_peak_rss_mb=round(peak_rss_mb(pid), 1),
    )
    return result, load


class Bench:
    def __init__(self, devices: int, duration_s: float, workdir: Path) -> None:
        self.devices = devices
        self.duration_s = duration_s
        self.workdir = workdir
        self.registry = workdir / "devices.csv"
        write_bench_registry(self.registry, devices)

    def _gateway_env(self, name: str, broker_port: int, coap_port: int, metrics_port: int
                     ) -> dict[str, str]:
        return {
            "NBIOT_GATEWAY__LOG_LEVEL": "WARNING",
            "NBIOT_GATEWAY__TENANT": "bench",
            "NBIOT_COAP__BIND": "127.0.0.1",
            "NBIOT_COAP__PORT": str(coap_port),
            "NBIOT_MQTT__HOST": "127.0.0.1",
            "NBIOT_MQTT__PORT": str(broker_port),
            "NBIOT_SPOOL__PATH": str(self.workdir / name / "spool.sqlite"),
            "NBIOT_METRICS__PORT": str(metrics_port),
            "NBIOT_REGISTRY__PATH": str(self.registry),
            "NBIOT_LIMITS__PER_DEVICE_RATE": "0",  # the load sends far faster than a sensor
        }

    def _gateway_args(self) -> list[str]:
        return [sys.executable, "-m", "gateway", "run", "--config", str(ROOT_CONFIG)]

    def gateway_end_to_end(self, rate: float | None = None, name: str = "gateway") -> Result:
        broker_port, coap_port, metrics_port = (free_port(socket.SOCK_STREAM),
                                                free_port(socket.SOCK_DGRAM),
                                                free_port(socket.SOCK_STREAM))
        conf = self.workdir / f"{name}-mosquitto.conf"
        conf.write_text(f"listener {broker_port} 127.0.0.1\nallow_anonymous true\n"
                        "max_queued_messages 0\nmax_inflight_messages 0\n")
        witness_file = self.workdir / f"{name}-delivered.txt"
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        env = self._gateway_env(name, broker_port, coap_port, metrics_port)
        with process([mosquitto, "-c", str(conf)], self.workdir / f"{name}-mosquitto.log"):
            wait(lambda: tcp_answers(broker_port), 10, "mosquitto")
            with process(["mosquitto_sub", "-p", str(broker_port), "-q", "1",
                           "-t", "nbiot/bench/+/+/up", "-F", "%p"], witness_file) as witness, \
                 process(self._gateway_args(), self.workdir / f"{name}.log", env) as gw:
                wait(lambda: udp_answers(coap_port), 20, "the gateway")
                wait(lambda: metric(metrics_port, "nbiot_gateway_mqtt_connected") == 1, 20,
                      "the gateway's broker connection")
                result, load = measure(name, gw.pid, coap_port, self.devices,
                                        self.duration_s, rate=rate)
                acked = {(bench_device_id(i), seq) for i, seq in load["acked"]}
                wait(lambda: metric(metrics_port, "nbiot_gateway_spool_records") == 0,
                      120, "the spool to drain")
                delivered = wait_delivered(witness_file, acked)
                witness.terminate()
        result.delivered = len(acked & delivered)
        result.lost = len(acked - delivered)
        if rate:
            result.note = f"paced at {rate:.0f}/s"
        return result

    def gateway_without_broker(self) -> Result:
        coap_port, metrics_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
        closed_port = free_port(socket.SOCK_STREAM)  # nothing listens there
        env = self._gateway_env("spool-only", closed_port, coap_port, metrics_port)
        with process(self._gateway_args(), self.workdir / "spool-only.log", env) as gw:
            wait(lambda: udp_answers(coap_port), 20, "the gateway")
            result, _ = measure("gateway, broker down", gw.pid, coap_port, self.devices,
                                 self.duration_s)
        result.note = "ingest into the spool only"
        return result

    def aiocoap_bare(self) -> Result:
        port = free_port(socket.SOCK_DGRAM)
        with process([sys.executable, "-m", "gateway.bench.peers", "--port", str(port)],
                      self.workdir / "aiocoap.log") as peer:
            wait(lambda: udp_answers(port), 20, "the aiocoap server")
            result, _ = measure("aiocoap (bare)", peer.pid, port, self.devices, self.duration_s)
        return result

    def libcoap(self) -> Result:
        port = free_port(socket.SOCK_DGRAM)
        binary = shutil.which("coap-server-notls")
        if binary is None:
            return Result("libcoap", note="coap-server-notls missing: apt-get install libcoap3-bin")
        with process([binary, "-A", "127.0.0.1", "-p", str(port), "-d", str(self.devices + 10),
                       "-v", "0"], self.workdir / "libcoap.log") as peer:
            wait(lambda: udp_answers(port), 20, "coap-server-notls")
            result, _ = measure("libcoap (C)", peer.pid, port, self.devices, self.duration_s,
                                 method="PUT")
        result.note = "PUT to dynamic resources"
        return result


def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def read_delivered(path: Path) -> set[tuple[str, int]]:
    seen = set()
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            message = json.loads(line)
            seen.add((message["device_id"], message["seq"]))
    return seen


def wait_delivered(path: Path, acked: set[tuple[str, int]], timeout_s: float = 30
                    ) -> set[tuple[str, int]]:
    deadline = time.monotonic() + timeout_s
    while True:
        delivered = read_delivered(path)
        if acked <= delivered or time.monotonic() > deadline:
            return delivered
        time.sleep(0.2)


def machine() -> str:
    cpu = "unknown cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB, Python "
            f"{platform.python_version()}, {platform.system()} {platform.release()}")


def _print_table(results: list[Result], devices: int, duration_s: float) -> None:
    print(f"\nnbiot-gateway bench: {devices} devices, closed loop, {duration_s:g}s per target")
    print(f"machine: {machine()}")
    print("load generator: one process, raw CoAP CON requests, one UDP endpoint per device\n")
    header = (f"{'target':<24}{'uplinks/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'cpu s/1k':>10}"
              f"{'peak MB':>9}{'lost':>7}  note")
    print(header)
    print("-" * len(header))
    for r in results:
        lost = "" if r.lost is None else str(r.lost)
        print(f"{r.target:<24}{r.uplinks_per_s:>11,.0f}{r.ack_p50_ms:>9.1f}{r.ack_p99_ms:>9.1f}"
              f"{r.server_cpu_s_per_1000:>10.3f}{r.server_peak_rss_mb:>9.0f}{lost:>7}  {r.note}")


def run_bench(devices: int, duration_s: float, json_out: Path | None) -> int:
    with tempfile.TemporaryDirectory(prefix="nbiot-bench-") as tmp:
        bench = Bench(devices, duration_s, Path(tmp))
        gateway = bench.gateway_end_to_end()
        results = [gateway, bench.aiocoap_bare(), bench.libcoap(), bench.gateway_without_broker()]
        if gateway.uplinks_per_s:
            results.append(bench.gateway_end_to_end(rate=gateway.uplinks_per_s / 2,
                                                    name="gateway at half rate"))
    _print_table(results, devices, duration_s)
    by_target = {r.target: r for r in results}
    ratios = {}
    for ref in ("aiocoap (bare)", "libcoap (C)"):
        if by_target[ref].uplinks_per_s:
            ratios[f"gateway/{ref.split()[0]}"] = round(
                gateway.uplinks_per_s / by_target[ref].uplinks_per_s, 2)
    spool_only = by_target["gateway, broker down"].uplinks_per_s
    if gateway.uplinks_per_s:
        ratios["broker_down/end_to_end"] = round(spool_only / gateway.uplinks_per_s, 2)
    print("\nratios: " + ", ".join(f"{k} = {v}" for k, v in ratios.items()))
    if json_out is not None:
        json_out.write_text(json.dumps({"devices": devices, "duration_s": duration_s,
                                        "machine": machine(), "ratios": ratios,
                                        "results": [asdict(r) for r in results]}, indent=2))
        print(f"written to {json_out}")
    lost = sum(r.lost or 0 for r in results)
    if lost:
        print(f"\nLOST: {lost} acknowledged uplinks never reached the broker", file=sys.stderr)
    return 1 if lost else 0
