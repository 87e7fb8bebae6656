"""Peak RSS of the gateway with 100,000 registered devices once every one has reported.

Run: .venv/bin/python benchmarks/memory_100k.py [--devices 100000]
Real gateway, real mosquitto, the bench's load generator in batches below the open-files
limit (one UDP socket per device). Prints the gateway's peak RSS (VmHWM) before and after,
and the liveness gauges that prove every device was seen. The target: <= 300 MB.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from gateway.bench.loadgen import write_bench_registry
from gateway.bench.runner import (
    ROOT_CONFIG,
    free_port,
    loadgen,
    metric,
    peak_rss_mb,
    process,
    tcp_answers,
    udp_answers,
    wait,
)

BATCH = 16_000  # sockets per load generator process: below the 20,000 descriptor limit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=100_000)
    devices = parser.parse_args().devices
    with tempfile.TemporaryDirectory(prefix="nbiot-mem-") as tmp:
        work = Path(tmp)
        write_bench_registry(work / "devices.csv", devices)
        broker_port, coap_port, metrics_port = (free_port(socket.SOCK_STREAM),
                                                free_port(socket.SOCK_DGRAM),
                                                free_port(socket.SOCK_STREAM))
        (work / "mosquitto.conf").write_text(f"listener {broker_port} 127.0.0.1\n"
                                             "allow_anonymous true\n")
        env = {"NBIOT_GATEWAY__LOG_LEVEL": "WARNING", "NBIOT_COAP__BIND": "127.0.0.1",
               "NBIOT_COAP__PORT": str(coap_port), "NBIOT_MQTT__PORT": str(broker_port),
               "NBIOT_MQTT__HOST": "127.0.0.1", "NBIOT_METRICS__PORT": str(metrics_port),
               "NBIOT_SPOOL__PATH": str(work / "spool.sqlite"),
               "NBIOT_REGISTRY__PATH": str(work / "devices.csv"),
               "NBIOT_LIMITS__PER_DEVICE_RATE": "0"}
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with process([mosquitto, "-c", str(work / "mosquitto.conf")], work / "mosquitto.log"):
            wait(lambda: tcp_answers(broker_port), 10, "mosquitto")
            with process([sys.executable, "-m", "gateway", "run", "--config", str(ROOT_CONFIG)],
                          work / "gateway.log", env) as gw:
                wait(lambda: udp_answers(coap_port), 60, "the gateway")
                started_mb = peak_rss_mb(gw.pid)
                for first in range(0, devices, BATCH):
                    n = min(BATCH, devices - first)
                    loadgen(coap_port, n, 2.0, first_device=first)
                wait(lambda: metric(metrics_port, "nbiot_gateway_spool_records") == 0, 120,
                      "the spool to drain")
                time.sleep(1)
                online = metric(metrics_port, 'nbiot_gateway_devices{state="online"}') or 0.0
                peak_mb = peak_rss_mb(gw.pid)
    print(f"gateway with {devices:,} registered devices: peak RSS {started_mb:.0f} MB after "
          f"start, {peak_mb:.0f} MB once {online:,.0f} devices had reported (target <= 300 MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
