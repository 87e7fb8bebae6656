"""Which delivery witness keeps up with the broker: the simulator's own (gateway/tools/sim/witness.py,
our lean MQTT client in a process of its own) or mosquitto_sub, each reading the same burst
of QoS 1 uplink messages from mosquitto as fast as it delivers them.

A publisher (our MQTT client, window 1,000) floods N messages shaped like the gateway's
uplinks; we time how long after the last PUBACK the subscriber has them all, and read its
CPU from /proc. mosquitto_sub's lines would still need parsing and routing to the fleet in
Python, which this does not count in its favour or against it.

Run: .venv/bin/python benchmarks/witness_rate.py [--messages 100000] [--rate 0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from gateway.config import MqttSection
from gateway.mqtt.client import MqttClient
from gateway.tools import localstack
from gateway.tools.bench.flood import publish_windowed
from gateway.tools.demo import MOSQUITTO_CONF
from gateway.tools.sim.processes import Child
from gateway.tools.sim.witness import WitnessSpec

TOPIC = "nbiot/plant/env_th/{}/up"
WINDOW = 1000
PAYLOAD = ('{{"device_id":"{}","device_type":"env_th","tenant":"plant","gateway_id":"gw1",'
           '"seq":{},"received_at":"2026-11-27T05:12:44.347Z","device_time":'
           '"2026-11-27T05:12:44.000Z","readings":{{"temperature":{{"value":21.5,"unit":"Cel"}},'
           '"humidity":{{"value":40.2,"unit":"%RH"}}}},"transport":"coap"}}')


async def publish(port: int, n: int, rate: float) -> float:
    """Publish n messages, at most WINDOW awaiting PUBACK, `rate` a second (0: as fast as
    the broker acknowledges); the time of the last PUBACK."""
    client = await MqttClient.connect("127.0.0.1", port, client_id="bench-publisher")
    messages = ((TOPIC.format(f"dev-{i % 10000:05d}"),
                 PAYLOAD.format(f"dev-{i % 10000:05d}", i).encode()) for i in range(n))
    finished = await publish_windowed(client, messages, n, WINDOW, rate)
    await client.disconnect()
    return finished


async def count_lines(reader: asyncio.StreamReader, n: int, prefix_skip: bytes = b"") -> float:
    seen = 0
    while seen < n:
        line = await reader.readline()
        if not line:
            raise RuntimeError("the subscriber stopped")
        if prefix_skip and line.startswith(prefix_skip):
            continue
        seen += 1
    return time.monotonic()


async def ours(port: int, n: int, rate: float) -> tuple[float, float, float, float]:
    read_end, write_end = os.pipe()
    child = await Child.start("witness", "gateway.tools.sim.witness", (write_end,))
    os.close(write_end)
    await child.send(WitnessSpec(MqttSection(host="127.0.0.1", port=port), "nbiot/plant/+/+/up",
                                 "nbiot/plant/invalid", (write_end,)))
    await child.expect("subscribed", 30)
    await child.send([[]])
    await child.expect("routed", 30)
    cpu_before = localstack.cpu_s(child.proc.pid)
    reader = asyncio.StreamReader(limit=1 << 20)
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                 os.fdopen(read_end, "rb", buffering=0))
    started = time.monotonic()
    counted = asyncio.ensure_future(count_lines(reader, n, prefix_skip=b"@"))
    published = await publish(port, n, rate)
    received = await counted
    cpu = localstack.cpu_s(child.proc.pid) - cpu_before
    await child.stop()
    return started, published, received, cpu


async def theirs(port: int, n: int, rate: float) -> tuple[float, float, float, float]:
    binary = shutil.which("mosquitto_sub")
    assert binary, "mosquitto_sub is not installed (apt-get install mosquitto-clients)"
    proc = await asyncio.create_subprocess_exec(
        binary, "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", "nbiot/plant/+/+/up",
        "-F", "%U %t %p", stdout=asyncio.subprocess.PIPE, limit=1 << 20)
    await asyncio.sleep(1.0)  # subscribed (a bench, not a test)
    assert proc.stdout is not None
    cpu_before = localstack.cpu_s(proc.pid)
    started = time.monotonic()
    counted = asyncio.ensure_future(count_lines(proc.stdout, n))
    published = await publish(port, n, rate)
    received = await counted
    cpu = localstack.cpu_s(proc.pid) - cpu_before
    proc.terminate()
    await proc.wait()
    return started, published, received, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="messages per second (default 0: as fast as the broker takes them)")
    args = parser.parse_args()
    n = args.messages
    with tempfile.TemporaryDirectory(prefix="nbiot-witness-") as tmp, \
            localstack.mosquitto(Path(tmp), MOSQUITTO_CONF) as broker:
        for name, run in (("sim witness", ours), ("mosquitto_sub", theirs)):
            started, published, received, cpu = asyncio.run(run(broker.port, n, args.rate))
            print(f"{name:14} {n} messages published at {n / (published - started):,.0f}/s; "
                  f"the last received {1000 * (received - published):+,.0f} ms from the last PUBACK "
                  f"({n / (received - started):,.0f}/s end to end); subscriber CPU {cpu:.2f} s "
                  f"= {cpu / n * 1e6:.1f} µs per message")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
