"""Peak RSS of the gateway with 100,000 registered devices once every one has reported.

Run: .venv/bin/python benchmarks/memory_100k.py [--devices 100000]
Real gateway, real mosquitto, the bench's load generator in batches below the open-files
limit (one UDP socket per device). Prints the gateway's peak RSS (VmHWM) before and after,
and the liveness gauges that prove every device was seen. The target: <= 300 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import tempfile
import time
from pathlib import Path

from gateway.tools import localstack
from gateway.tools.bench.loadgen import write_bench_registry
from gateway.tools.bench.runner import loadgen

BATCH = 16_000  # sockets per load generator process: below the 20,000 descriptor limit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=100_000)
    devices = parser.parse_args().devices
    with tempfile.TemporaryDirectory(prefix="nbiot-mem-") as tmp:
        work = Path(tmp)
        write_bench_registry(work / "devices.csv", devices)
        coap_port = localstack.free_port(socket.SOCK_DGRAM)
        metrics_port = localstack.free_port()
        with contextlib.ExitStack() as stack:
            broker = stack.enter_context(localstack.mosquitto(work))
            env = {**localstack.gateway_env(broker_port=broker.port, coap_port=coap_port,
                                            metrics_port=metrics_port, spool=work / "spool.sqlite",
                                            registry=work / "devices.csv"),
                   **localstack.LOAD_ENV}
            gw = stack.enter_context(localstack.gateway(
                env, work / "gateway.log", lambda: localstack.coap_answers(coap_port),
                timeout_s=60))
            started_mb = localstack.peak_rss_mb(gw.pid)
            for first in range(0, devices, BATCH):
                n = min(BATCH, devices - first)
                loadgen(coap_port, n, 2.0, first_device=first)
            localstack.wait_until(
                lambda: localstack.metric_sample(metrics_port, "nbiot_gateway_spool_records") == 0,
                120, "the spool to drain")
            time.sleep(1)
            online = localstack.metric_sample(
                metrics_port, 'nbiot_gateway_devices{state="online"}') or 0.0
            peak_mb = localstack.peak_rss_mb(gw.pid)
    print(f"gateway with {devices:,} registered devices: peak RSS {started_mb:.0f} MB after "
          f"start, {peak_mb:.0f} MB once {online:,.0f} devices had reported (target <= 300 MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
