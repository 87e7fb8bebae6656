"""Closed-loop CoAP load generator for `nbiot-gateway bench`: N devices, one UDP endpoint
each, one CON POST (or PUT) outstanding per device, the next sent as soon as the reply
arrives (with `--rate`: at the device's next slot of an evenly paced schedule).
It runs in its own process, so it does not share an event loop with the server.

Prints one JSON object on stdout. Bounded: it stops by itself after `duration_s`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from gateway.ingest.coap import numbers as C
from gateway.ingest.coap import wire

RETRY_AFTER_S = 1.0


def bench_device_id(i: int) -> str:
    return f"bench-{i:06d}"


def bench_token(i: int) -> str:
    return f"tok{i:06d}"


def write_bench_registry(path: Path, devices: int, device_type: str = "env_th",
                         report_interval_s: int = 60) -> None:
    with path.open("w") as f:
        f.write("device_id,type,token,report_interval_s\n")
        for i in range(devices):
            f.write(f"{bench_device_id(i)},{device_type},{bench_token(i)},{report_interval_s}\n")


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


@dataclass
class Totals:
    sent: int = 0
    retransmissions: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    acked: list[tuple[int, int]] = field(default_factory=list)  # (device index, seq)


class DeviceEndpoint(asyncio.DatagramProtocol):
    """One simulated device: a connected UDP socket and one request in flight."""

    def __init__(self, index: int, method: int, path: tuple[str, ...], totals: Totals,
                 stop_at: float, period_s: float | None, seq_base: int = 0) -> None:
        self.index = index
        self.method = method
        self.path = path
        self.totals = totals
        self.stop_at = stop_at
        self.transport: asyncio.DatagramTransport | None = None
        self.seq = seq_base
        self.mid = int.from_bytes(os.urandom(2), "big")
        self.request = b""
        self.sent_at = 0.0
        self.first_sent_at = 0.0
        self.waiting = False
        self.query = f"k={bench_token(index)}".encode()
        self.period_s = period_s
        self.next_slot = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send_next(self) -> None:
        now = time.monotonic()
        if now >= self.stop_at or self.transport is None:
            self.waiting = False
            return
        self.seq += 1
        self.mid = (self.mid + 1) & 0xFFFF
        payload = b'{"seq":%d,"temperature":21.5,"humidity":40.2}' % self.seq
        options = [(C.URI_PATH, p.encode()) for p in self.path]
        options += [(C.CONTENT_FORMAT, b"\x32"), (C.URI_QUERY, self.query)]
        self.request = wire.encode(wire.Message(C.CON, self.method, self.mid,
                                                self.mid.to_bytes(2, "big"), options, payload))
        self.sent_at = self.first_sent_at = now
        self.waiting = True
        self.totals.sent += 1
        self.transport.sendto(self.request)

    def retransmit_if_due(self, now: float) -> None:
        if self.waiting and now - self.sent_at > RETRY_AFTER_S and self.transport is not None:
            self.sent_at = now
            self.totals.retransmissions += 1
            self.transport.sendto(self.request)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.waiting or len(data) < 4 or (data[2] << 8 | data[3]) != self.mid:
            return
        code = data[1]
        key = C.code_str(code)
        self.totals.codes[key] = self.totals.codes.get(key, 0) + 1
        self.totals.latencies_s.append(time.monotonic() - self.first_sent_at)
        if code >> 5 == 2:
            self.totals.acked.append((self.index, self.seq))
        self.waiting = False
        if self.period_s is None:
            self.send_next()
        else:
            self.next_slot = max(self.next_slot + self.period_s, time.monotonic())
            asyncio.get_running_loop().call_at(self.next_slot, self.send_next)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable while the server starts or stops: the retry timer covers it


async def run(host: str, port: int, devices: int, duration_s: float, method: int,
              path_prefix: tuple[str, ...], first_device: int, rate: float | None,
              seq_base: int = 0) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    totals = Totals()
    endpoints: list[DeviceEndpoint] = []
    stop_at = time.monotonic() + duration_s + 3600  # reset once all sockets exist
    period_s = devices / rate if rate else None
    for i in range(first_device, first_device + devices):
        ep = DeviceEndpoint(i, method, (*path_prefix, bench_device_id(i)), totals, stop_at,
                            period_s, seq_base)
        await loop.create_datagram_endpoint(lambda ep=ep: ep, remote_addr=(host, port),  # type: ignore[misc]
                                            family=socket.AF_INET)
        endpoints.append(ep)
    started = time.monotonic()
    for n, ep in enumerate(endpoints):
        ep.stop_at = started + duration_s
        if period_s is None:
            ep.send_next()
        else:  # spread the first requests evenly over one period
            ep.next_slot = started + period_s * n / devices
            loop.call_at(ep.next_slot, ep.send_next)
    while time.monotonic() < started + duration_s + RETRY_AFTER_S * 3:
        await asyncio.sleep(0.1)
        now = time.monotonic()
        if now > started + duration_s and not any(ep.waiting for ep in endpoints):
            break
        for ep in endpoints:
            ep.retransmit_if_due(now)
    elapsed = min(time.monotonic(), started + duration_s) - started
    unanswered = sum(1 for ep in endpoints if ep.waiting)
    for ep in endpoints:
        if ep.transport is not None:
            ep.transport.close()
    lat = sorted(totals.latencies_s)
    answered = len(lat)
    return {
        "devices": devices,
        "duration_s": round(elapsed, 3),
        "sent": totals.sent,
        "answered": answered,
        "unanswered": unanswered,
        "retransmissions": totals.retransmissions,
        "codes": totals.codes,
        "rate_per_s": round(answered / elapsed, 1) if elapsed else 0.0,
        "ack_latency_ms": {q: round(percentile(lat, float(q[1:])) * 1000, 2)
                           for q in ("p50", "p95", "p99")},
        "acked": totals.acked,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--devices", type=int, default=2000)
    p.add_argument("--first-device", type=int, default=0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--method", choices=["POST", "PUT"], default="POST")
    p.add_argument("--path-prefix", default="up")
    p.add_argument("--rate", type=float, default=None,
                   help="total requests/s, evenly paced (default: closed loop, as fast as served)")
    p.add_argument("--seq-base", type=int, default=0,
                   help="each device's first seq is this + 1 (a later run against the same "
                        "gateway must start above the last, or its uplinks are stale)")
    args = p.parse_args(argv)
    method = C.POST if args.method == "POST" else C.PUT
    prefix = tuple(s for s in args.path_prefix.split("/") if s)
    # uvloop: the generator must outrun libcoap's server, or the bench understates it
    # (docs/decisions.md: 47,000 vs 25,000 requests/s with plain asyncio).
    result = uvloop.run(run(args.host, args.port, args.devices, args.duration, method, prefix,
                             args.first_device, args.rate, args.seq_base))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
