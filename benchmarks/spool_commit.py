"""The spool alone at the plant's shape: disk bytes and fsyncs per record, by commit linger.

Run: .venv/bin/python benchmarks/spool_commit.py [--seconds 60] [--rates 667,4000]
     [--lingers 0,10,20,30] [--devices 40000]
The real Spool on a real file (not tmpfs: /proc/self/io counts what reaches the block
layer), 40,000 devices' replay state, records appended paced (open loop) at each rate from
a random device, each deleted as soon as it is committed (a broker that keeps up), after a
warm-up of one record per device and 5 s at the same pace. Prints per (rate, linger):
bytes written per record (write_bytes less cancelled_write_bytes of /proc/self/io: the
WAL, its checkpoints into the main file, the seq_log folds), commits (fsyncs) per second,
records per commit, process CPU per record, and append-to-durable p50/p99. Figures only;
docs/decisions.md ("The commit path at the plant's load") holds a run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

from gateway.model import Record
from gateway.pipeline.replay import Seen
from gateway.store.spool import Spool

PAYLOAD = (b'{"device_id":"dev-012345","device_type":"climate","seq":1234,'
           b'"received_at":"2026-12-01T08:00:00.123Z","device_time":"2026-12-01T08:00:00.000Z",'
           b'"transport":"coap","readings":{"temperature":{"value":21.5,"unit":"Cel"},'
           b'"humidity":{"value":40.1,"unit":"%RH"}},"gateway_id":"gw-1"}')


def disk_bytes() -> int:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["write_bytes"]) - int(fields["cancelled_write_bytes"])


async def run(rate: float, seconds: float, linger_ms: float, devices: int) -> dict[str, float]:
    directory = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="spool-bench-"))
    spool = Spool(directory / "spool.sqlite", 1 << 34, linger_s=linger_ms / 1000)
    spool.open()
    commits = 0

    def counted(records: int, seconds: float) -> None:
        nonlocal commits
        commits += 1

    spool.on_commit = counted
    seqs: dict[str, int] = {}

    def append(device: int, on_durable: object = None) -> None:
        device_id = f"dev-{device:06d}"
        seq = seqs[device_id] = seqs.get(device_id, 0) + 1
        spool.append(Record(f"nbiot/plant/climate/{device_id}/up", PAYLOAD),
                     on_durable, (device_id, seq, time.time(), Seen.NEW))  # type: ignore[arg-type]

    async def broker() -> None:  # deletes what is committed, as PUBACKs would
        after = 0
        while True:
            await spool.wait_for_records()
            records = await spool.read_after(after, 5000)
            if records:
                after = records[-1].spool_id
                spool.delete(records)

    async def paced(count: int, latencies: list[float] | None) -> None:
        start = time.perf_counter()
        for k in range(count):
            delay = start + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if latencies is None:
                append(random.randrange(devices))
            else:
                sent = time.perf_counter()
                append(random.randrange(devices),
                       lambda ok, sent=sent: latencies.append(time.perf_counter() - sent))
        await spool.wait_committed()

    for device in range(devices):
        append(device)
    await spool.wait_committed()
    reader = asyncio.create_task(broker())
    await paced(int(rate * 5), None)
    latencies: list[float] = []
    written, commits_before, cpu = disk_bytes(), commits, time.process_time()
    await paced(int(rate * seconds), latencies)
    await spool.wait_deleted()
    n = len(latencies)
    result = {
        "bytes_per_record": (disk_bytes() - written) / n,
        "commits_per_s": (commits - commits_before) / seconds,
        "records_per_commit": n / max(1, commits - commits_before),
        "cpu_us_per_record": (time.process_time() - cpu) / n * 1e6,
        "p50_ms": sorted(latencies)[n // 2] * 1e3,
        "p99_ms": sorted(latencies)[int(n * 0.99)] * 1e3,
    }
    reader.cancel()
    await spool.close()
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rates", default="667,4000")
    parser.add_argument("--lingers", default="0,10,20,30")
    parser.add_argument("--devices", type=int, default=40_000)
    args = parser.parse_args()
    print(f"{'rate/s':>7} {'linger':>7} {'B/record':>9} {'commits/s':>10} {'rec/commit':>11} "
          f"{'CPU µs/rec':>11} {'p50 ms':>7} {'p99 ms':>7}")
    for rate in [float(r) for r in args.rates.split(",")]:
        for linger in [float(x) for x in args.lingers.split(",")]:
            r = asyncio.run(run(rate, args.seconds, linger, args.devices))
            print(f"{rate:7.0f} {linger:6.0f}ms {r['bytes_per_record']:9.0f} "
                  f"{r['commits_per_s']:10.1f} {r['records_per_commit']:11.1f} "
                  f"{r['cpu_us_per_record']:11.1f} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
