"""`nbiot-gateway bench`: one load generator, four servers, measured side by side in one run.

1. the gateway end to end (spool on disk, real mosquitto, QoS 1, every ack checked delivered)
2. a bare aiocoap server (root resource answering 2.04)
3. libcoap's coap-server-notls (dynamic resources accept PUT)
4. the gateway with no broker (ingest into the spool alone)
then the gateway again at half its maximum rate, for the latency at a sane load, and with
`--workers N` worker processes (gateway.workers), for the scaling from one.
Prints a table and ratios; `--json FILE` writes them. It asserts nothing: figures only.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.tools.bench.loadgen import bench_device_id, write_bench_registry
from gateway.tools.localstack import (
    LOAD_ENV,
    child_process,
    coap_answers,
    cpu_s,
    free_port,
    gateway,
    gateway_env,
    metric_sample,
    mosquitto,
    peak_rss_mb,
    wait_ready,
    wait_until,
)

# The gateway's broker queues without limit: the witness must see every message.
MOSQUITTO_CONF = ("max_queued_messages 0", "max_inflight_messages 0")


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


def loadgen(port: int, devices: int, duration_s: float, method: str = "POST",
            rate: float | None = None, first_device: int = 0, seq_base: int = 0
            ) -> dict[str, Any]:
    args = [sys.executable, "-m", "gateway.tools.bench.loadgen", "--port", str(port),
            "--devices", str(devices), "--duration", str(duration_s), "--method", method,
            "--first-device", str(first_device), "--seq-base", str(seq_base)]
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

    def _gateway_env(self, name: str, broker_port: int, coap_port: int, metrics_port: int,
                     workers: int = 1) -> dict[str, str]:
        return {**gateway_env(broker_port=broker_port, coap_port=coap_port,
                              metrics_port=metrics_port, spool=self.workdir / name / "spool.sqlite",
                              registry=self.registry),
                **LOAD_ENV, "NBIOT_GATEWAY__TENANT": "bench",
                "NBIOT_GATEWAY__WORKERS": str(workers)}

    def gateway_end_to_end(self, rate: float | None = None, name: str = "gateway",
                           workers: int = 1) -> Result:
        coap_port, metrics_port = free_port(socket.SOCK_DGRAM), free_port()
        witness_file = self.workdir / f"{name}-delivered.txt"
        with contextlib.ExitStack() as stack:
            broker = stack.enter_context(mosquitto(self.workdir, MOSQUITTO_CONF,
                                                   name=f"{name}-mosquitto"))
            witness = stack.enter_context(child_process(
                ["mosquitto_sub", "-p", str(broker.port), "-q", "1", "-t", "nbiot/bench/+/+/up",
                 "-F", "%p"], witness_file))
            env = self._gateway_env(name, broker.port, coap_port, metrics_port, workers)
            gw = stack.enter_context(gateway(env, self.workdir / f"{name}.log",
                                             lambda: coap_answers(coap_port)))
            wait_until(lambda: metric_sample(metrics_port, "nbiot_gateway_mqtt_connected") == 1, 20,
                       "the gateway's broker connection")
            result, load = measure(name, gw.pid, coap_port, self.devices, self.duration_s,
                                   rate=rate)
            acked = {(bench_device_id(i), seq) for i, seq in load["acked"]}
            wait_until(lambda: metric_sample(metrics_port, "nbiot_gateway_spool_records") == 0,
                       120, "the spool to drain")
            delivered = wait_delivered(witness_file, acked)
            witness.terminate()
        result.delivered = len(acked & delivered)
        result.lost = len(acked - delivered)
        if rate:
            result.note = f"paced at {rate:.0f}/s"
        if workers > 1:
            result.note = f"gateway.workers = {workers}"
        return result

    def gateway_without_broker(self) -> Result:
        coap_port, metrics_port = free_port(socket.SOCK_DGRAM), free_port()
        closed_port = free_port()  # nothing listens there
        env = self._gateway_env("spool-only", closed_port, coap_port, metrics_port)
        with gateway(env, self.workdir / "spool-only.log", lambda: coap_answers(coap_port)) as gw:
            result, _ = measure("gateway, broker down", gw.pid, coap_port, self.devices,
                                self.duration_s)
        result.note = "ingest into the spool only"
        return result

    def aiocoap_bare(self) -> Result:
        port = free_port(socket.SOCK_DGRAM)
        log = self.workdir / "aiocoap.log"
        with child_process([sys.executable, "-m", "gateway.tools.bench.peers", "--port", str(port)],
                           log) as peer:
            wait_ready(peer, "the aiocoap server", log, lambda: coap_answers(port))
            result, _ = measure("aiocoap (bare)", peer.pid, port, self.devices, self.duration_s)
        return result

    def libcoap(self) -> Result:
        port = free_port(socket.SOCK_DGRAM)
        binary = shutil.which("coap-server-notls")
        if binary is None:
            return Result("libcoap", note="coap-server-notls missing: apt-get install libcoap3-bin")
        log = self.workdir / "libcoap.log"
        with child_process([binary, "-A", "127.0.0.1", "-p", str(port), "-d",
                            str(self.devices + 10), "-v", "0"], log) as peer:
            wait_ready(peer, "coap-server-notls", log, lambda: coap_answers(port))
            result, _ = measure("libcoap (C)", peer.pid, port, self.devices, self.duration_s,
                                method="PUT")
        result.note = "PUT to dynamic resources"
        return result


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


def run_bench(devices: int, duration_s: float, json_out: Path | None, workers: int = 2) -> int:
    with tempfile.TemporaryDirectory(prefix="nbiot-bench-") as tmp:
        bench = Bench(devices, duration_s, Path(tmp))
        gateway = bench.gateway_end_to_end()
        results = [gateway, bench.aiocoap_bare(), bench.libcoap(), bench.gateway_without_broker()]
        if gateway.uplinks_per_s:
            results.append(bench.gateway_end_to_end(rate=gateway.uplinks_per_s / 2,
                                                    name="gateway at half rate"))
        if workers > 1:
            results.append(bench.gateway_end_to_end(name=f"gateway, {workers} workers",
                                                    workers=workers))
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
        scaled = by_target.get(f"gateway, {workers} workers")
        if scaled is not None:
            ratios[f"workers_{workers}/workers_1"] = round(
                scaled.uplinks_per_s / gateway.uplinks_per_s, 2)
            ratios[f"gateway_{workers}_workers/libcoap"] = round(
                scaled.uplinks_per_s / by_target["libcoap (C)"].uplinks_per_s, 2) \
                if by_target["libcoap (C)"].uplinks_per_s else 0.0
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
