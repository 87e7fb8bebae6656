"""CPU per uplink of the gateway's own code, without the UDP system calls.

Run: .venv/bin/python benchmarks/inprocess.py [--uplinks 100000] [--profile]
The whole service in this process (real spool on disk, real mosquitto, QoS 1, its writer
thread and publisher), with CoAP datagrams handed straight to the endpoint's
`datagram_received` and replies caught instead of sent: 2,000 devices, at most 2,000
uplinks awaiting their reply, as `nbiot-gateway bench` runs them. Prints CPU seconds per
uplink of the event-loop thread and of the process. The per-step figures in
docs/decisions.md ("The hot path, second pass" and after) come from this; `--profile`
adds cProfile's top functions (which slows everything ~2x: compare shares, not times).
"""

# ruff: noqa: ASYNC110  (the benchmark polls the service from outside, as a client would)
from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.ingest.coap import wire
from gateway.ingest.coap.numbers import CON, POST, URI_PATH, URI_QUERY
from gateway.tools.bench.loadgen import bench_device_id, bench_token, write_bench_registry
from gateway.tools.bench.runner import MOSQUITTO_CONF
from gateway.tools.localstack import LOAD_ENV, SHIPPED_CONFIG, free_port, gateway_env, mosquitto

DEVICES = 2000
BATCH = 1000


class CaughtReplies:
    """Stands in for the UDP transport: counts replies by code."""

    def __init__(self) -> None:
        self.sent = 0
        self.codes: dict[str, int] = {}

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent += 1
        code = f"{data[1] >> 5}.{data[1] & 31:02d}"
        self.codes[code] = self.codes.get(code, 0) + 1

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def datagrams(count: int) -> list[tuple[bytes, tuple[str, int]]]:
    out = []
    for i in range(count):
        device, seq = i % DEVICES, i // DEVICES
        options = [(URI_PATH, b"up"), (URI_PATH, bench_device_id(device).encode()),
                   (URI_QUERY, f"k={bench_token(device)}".encode())]
        payload = b'{"seq":%d,"temperature":21.5,"humidity":40.2}' % seq
        message = wire.Message(CON, POST, i & 0xFFFF, i.to_bytes(4, "big"), options, payload)
        out.append((wire.encode(message), ("127.0.0.1", 20000 + device)))
    return out


async def measure(count: int, profile: bool) -> None:
    from gateway.config import load_config
    from gateway.runtime.service import Service

    service = Service(load_config(SHIPPED_CONFIG))
    await service.startup()
    coap = service._coap
    assert coap is not None and service._publisher is not None and service._spool is not None
    replies = CaughtReplies()
    coap.connection_made(replies)  # type: ignore[arg-type]
    while not service._publisher.connected:
        await asyncio.sleep(0.05)
    grams = datagrams(count)
    profiler = cProfile.Profile() if profile else None
    thread0, process0, wall0 = time.thread_time(), time.process_time(), time.perf_counter()
    if profiler:
        profiler.enable()
    for start in range(0, count, BATCH):
        for data, addr in grams[start:start + BATCH]:
            coap.datagram_received(data, addr)
        while replies.sent < start + BATCH - DEVICES:  # at most DEVICES awaiting a reply
            await asyncio.sleep(0)
    while replies.sent < count or service._spool.records:
        await asyncio.sleep(0.001)
    if profiler:
        profiler.disable()
    thread_s = time.thread_time() - thread0
    process_s = time.process_time() - process0
    wall_s = time.perf_counter() - wall0
    print(f"{count} uplinks, replies {replies.codes}: event-loop thread "
          f"{thread_s / count * 1e6:.1f} µs/uplink, process {process_s / count * 1e6:.1f} "
          f"µs/uplink, {count / wall_s:,.0f} uplinks/s (everything published, spool empty)")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    service.stop.set()
    await service.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uplinks", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nbiot-inprocess-") as tmp:
        work = Path(tmp)
        registry = work / "devices.csv"
        write_bench_registry(registry, DEVICES)
        with mosquitto(work, MOSQUITTO_CONF) as broker:
            os.environ.update({
                **gateway_env(broker_port=broker.port, coap_port=free_port(socket.SOCK_DGRAM),
                              metrics_port=free_port(), spool=work / "spool.sqlite",
                              registry=registry),
                **LOAD_ENV, "NBIOT_GATEWAY__TENANT": "bench",
                # Datagrams arrive faster than any network delivers them: do not shed load.
                "NBIOT_LIMITS__MAX_LOOP_LAG_S": "100"})
            import uvloop

            uvloop.run(measure(args.uplinks, args.profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
