"""Open-loop CoAP load from a fleet of sleeping devices, for `bench --profile fleet` and
`soak`: uplinks leave on a fixed schedule whatever the replies, each exchange from a UDP
socket of its own (a fresh source port, as a device waking from PSM gets), closed after
its reply or when it gives up (RFC 7252 CON retransmission).

It never slows down for a slow gateway: that shows as late and unanswered uplinks, and
as this process's own lag behind the schedule, which it measures and reports. Bounded:
the schedule ends after `duration_s`, open exchanges get at most `give_up_s` more, and
at most `max_open` sockets are open at once.

Slot k of the schedule leaves at start + k / rate, from device k mod devices, with seq
seq_base + k // devices + 1. `--shards P --shard j` runs the slots k = j mod P, so P
processes share one schedule. `--device-ids FILE` (indices, one a line) sends from those
devices only: device k mod n of the file, n its length. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import base64
import heapq
import json
import math
import random
import resource
import select
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.ingest.coap import numbers as C
from gateway.ingest.coap import wire
from gateway.tools.bench.loadgen import bench_device_id, bench_token

# RFC 7252 4.8 transmission parameters.
ACK_TIMEOUT_S = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4
# Sends in one turn of the loop before replies are read again: at 4,000/s a late turn has
# a few dozen due, and reading replies between batches keeps their latency honest.
SEND_BATCH = 256
RECV_BYTES = 1500


class LogHistogram:
    """Counts of values (seconds) in buckets 2 % wide from 10 µs up: quantiles within 2 %,
    mergeable across processes, and small enough for an hours-long run."""

    MIN_S = 1e-5
    GROWTH = 1.02

    def __init__(self, counts: Mapping[int, int] | None = None) -> None:
        self.counts: dict[int, int] = dict(counts or {})
        self._log_growth = math.log(self.GROWTH)

    def observe(self, value_s: float) -> None:
        index = 0 if value_s <= self.MIN_S else 1 + int(math.log(value_s / self.MIN_S)
                                                         / self._log_growth)
        self.counts[index] = self.counts.get(index, 0) + 1

    def merge(self, other: LogHistogram) -> None:
        for index, n in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def quantile_s(self, q: float) -> float:
        """The upper bound of the bucket holding quantile `q` (0..1); 0 when empty."""
        total = self.total
        if not total:
            return 0.0
        rank = q * total
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return self.MIN_S * self.GROWTH ** index
        return self.MIN_S * self.GROWTH ** max(self.counts)

    def max_s(self) -> float:
        return self.MIN_S * self.GROWTH ** max(self.counts) if self.counts else 0.0

    def to_json(self) -> dict[str, int]:
        return {str(k): v for k, v in self.counts.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, int]) -> LogHistogram:
        return cls({int(k): v for k, v in data.items()})


class SlotSet:
    """A growable bitmap of slot numbers (acked or delivered uplinks): 1 bit per uplink,
    so an hours-long soak at 667/s needs ~300 KB an hour."""

    def __init__(self, data: bytes = b"") -> None:
        self.bits = bytearray(data)

    def add(self, slot: int) -> None:
        byte = slot >> 3
        if byte >= len(self.bits):
            self.bits.extend(bytes(max(byte + 1 - len(self.bits), len(self.bits))))
        self.bits[byte] |= 1 << (slot & 7)

    def __contains__(self, slot: int) -> bool:
        byte = slot >> 3
        return byte < len(self.bits) and bool(self.bits[byte] >> (slot & 7) & 1)

    def __len__(self) -> int:
        return int.from_bytes(self.bits, "little").bit_count()

    def union(self, other: SlotSet) -> None:
        if len(other.bits) > len(self.bits):
            self.bits.extend(bytes(len(other.bits) - len(self.bits)))
        for i, b in enumerate(other.bits):
            self.bits[i] |= b

    def missing_from(self, other: SlotSet) -> int:
        """How many slots of this set `other` lacks."""
        mine = int.from_bytes(self.bits, "little")
        theirs = int.from_bytes(other.bits, "little")
        return (mine & ~theirs).bit_count()

    def to_json(self) -> str:
        return base64.b64encode(bytes(self.bits)).decode()

    @classmethod
    def from_json(cls, data: str) -> SlotSet:
        return cls(base64.b64decode(data))


@dataclass(frozen=True)
class Schedule:
    """Which slots this process sends, when, from which device, with which seq."""

    rate_per_s: float
    duration_s: float
    devices: int
    seq_base: int = 0
    shard: int = 0
    shards: int = 1
    ids: tuple[int, ...] = ()  # the devices that send (`devices`: its length); () = all

    @property
    def slots(self) -> int:
        """Slots in the whole schedule (all shards)."""
        return math.floor(self.rate_per_s * self.duration_s + 1e-6)  # 4000 * 3.08625: 12345

    def device(self, slot: int) -> int:
        """The index of the device (bench_device_id) that sends `slot`."""
        return self.ids[slot % self.devices] if self.ids else slot % self.devices

    def seq(self, slot: int) -> int:
        return self.seq_base + slot // self.devices + 1

    def slot_of(self, device: int, seq: int) -> int:
        """The slot of `device` (its position in the schedule: with `ids`, in `ids`)."""
        return (seq - self.seq_base - 1) * self.devices + device


@dataclass
class Exchange:
    """One uplink in flight: its socket, request, and retransmission state."""

    sock: socket.socket
    slot: int
    mid: int
    token: bytes
    request: bytes
    first_sent_at: float
    timeout_s: float
    deadline: float
    retransmissions: int = 0
    done: bool = False


@dataclass
class Outcome:
    sent: int = 0
    answered: int = 0
    late: int = 0  # answered after ACK_TIMEOUT (a device would have retransmitted)
    unanswered: int = 0  # gave up, or still open when the run ended
    retransmissions: int = 0
    send_errors: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    acked: SlotSet = field(default_factory=SlotSet)
    latency: LogHistogram = field(default_factory=LogHistogram)
    lag: LogHistogram = field(default_factory=LogHistogram)  # actual send - scheduled send
    max_open: int = 0
    last_send_at: float = 0.0


class OpenLoopFleet:
    """The schedule, driven by one epoll loop (no asyncio: a socket per uplink through an
    event loop's transports costs several times the system calls' own price)."""

    def __init__(self, host: str, port: int, schedule: Schedule, path: tuple[str, ...],
                 max_open: int, give_up_s: float, rng: random.Random) -> None:
        self.addr = (host, port)
        self.schedule = schedule
        self.path = path
        self.max_open = max_open
        self.give_up_s = give_up_s
        self.rng = rng
        self.outcome = Outcome()
        self.open: dict[int, Exchange] = {}  # fd -> exchange
        self.timers: list[tuple[float, int, Exchange]] = []
        self.epoll = select.epoll()
        self._options: dict[int, bytes] = {}  # device -> its encoded options (cached)

    # -- requests -----------------------------------------------------------------
    def _options_of(self, device: int) -> bytes:
        options = self._options.get(device)
        if options is None:
            message = wire.Message(C.CON, C.POST, 0, b"", [
                *((C.URI_PATH, p.encode()) for p in self.path),
                (C.URI_PATH, bench_device_id(device).encode()),
                (C.CONTENT_FORMAT, b"\x32"),  # application/json
                (C.URI_QUERY, f"k={bench_token(device)}".encode())])
            options = self._options[device] = wire.encode(message)[4:]
        return options

    def _request(self, slot: int, mid: int, token: bytes) -> bytes:
        device = self.schedule.device(slot)
        payload = b'{"seq":%d,"temperature":21.5,"humidity":40.2}' % self.schedule.seq(slot)
        header = bytes((0x40 | len(token), C.POST, mid >> 8, mid & 0xFF))
        return b"".join((header, token, self._options_of(device), b"\xff", payload))

    # -- the loop -----------------------------------------------------------------
    def run(self, start_at: float) -> tuple[Outcome, int]:
        """Send the schedule from `start_at` (time.monotonic()), then wait up to `give_up_s`
        for the exchanges still open. The outcome, and how many slots were never sent."""
        sched = self.schedule
        slot = sched.shard
        interval_s = 1.0 / sched.rate_per_s
        end_at = start_at + sched.duration_s
        stop_at = end_at + self.give_up_s
        out = self.outcome
        while True:
            now = time.monotonic()
            batch = 0
            while (slot < sched.slots and len(self.open) < self.max_open and batch < SEND_BATCH
                   and start_at + slot * interval_s <= now):
                self._send(slot, start_at + slot * interval_s, now)
                slot += sched.shards
                batch += 1
            if batch:
                now = time.monotonic()
            self._fire_timers(now)
            if slot >= sched.slots and (not self.open or now >= stop_at):
                break
            if now >= stop_at:  # the gateway is too slow for the socket cap: stop anyway
                break
            next_at = self.timers[0][0] if self.timers else stop_at
            if slot < sched.slots and len(self.open) < self.max_open:
                next_at = min(next_at, start_at + slot * interval_s)
            for fd, _ in self.epoll.poll(max(0.0, min(next_at - now, 0.05))):
                self._readable(fd)
        out.unanswered += len(self.open)
        for exchange in list(self.open.values()):
            self._close(exchange)
        self.epoll.close()
        unsent = len(range(slot, sched.slots, sched.shards))
        return out, unsent

    def _send(self, slot: int, due_at: float, now: float) -> None:
        out = self.outcome
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        mid = self.rng.getrandbits(16)
        token = slot.to_bytes(4, "big")  # unique per uplink: a reused port is a new request
        request = self._request(slot, mid, token)
        timeout_s = ACK_TIMEOUT_S * (1 + self.rng.random() * (ACK_RANDOM_FACTOR - 1))
        exchange = Exchange(sock, slot, mid, token, request, now, timeout_s, now + timeout_s)
        try:
            sock.connect(self.addr)
            sock.send(request)
        except OSError:
            out.send_errors += 1  # the retransmission timer tries again
        self.open[sock.fileno()] = exchange
        self.epoll.register(sock.fileno(), select.EPOLLIN)
        heapq.heappush(self.timers, (exchange.deadline, slot, exchange))
        out.sent += 1
        out.lag.observe(now - due_at)
        out.max_open = max(out.max_open, len(self.open))
        out.last_send_at = now

    def _fire_timers(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            deadline, _, exchange = heapq.heappop(self.timers)
            if exchange.done or deadline != exchange.deadline:
                continue
            if exchange.retransmissions >= MAX_RETRANSMIT:
                self.outcome.unanswered += 1
                self._close(exchange)
                continue
            exchange.retransmissions += 1
            self.outcome.retransmissions += 1
            exchange.timeout_s *= 2
            exchange.deadline = now + exchange.timeout_s
            heapq.heappush(self.timers, (exchange.deadline, exchange.slot, exchange))
            try:
                exchange.sock.send(exchange.request)
            except OSError:
                self.outcome.send_errors += 1

    def _readable(self, fd: int) -> None:
        exchange = self.open.get(fd)
        if exchange is None:
            return
        try:
            data = exchange.sock.recv(RECV_BYTES)
        except OSError:  # ICMP unreachable (the server is not there) or nothing after all
            return
        tkl = data[0] & 0x0F if data else 0
        if (len(data) < 4 + tkl or (data[2] << 8 | data[3]) != exchange.mid
                or data[4:4 + tkl] != exchange.token):
            return
        code = data[1]
        out = self.outcome
        latency_s = time.monotonic() - exchange.first_sent_at
        out.answered += 1
        out.latency.observe(latency_s)
        if latency_s > ACK_TIMEOUT_S:
            out.late += 1
        key = C.code_str(code)
        out.codes[key] = out.codes.get(key, 0) + 1
        if code == C.CHANGED:
            out.acked.add(exchange.slot)
        self._close(exchange)

    def _close(self, exchange: Exchange) -> None:
        exchange.done = True
        self.open.pop(exchange.sock.fileno(), None)
        exchange.sock.close()  # closing also takes it off the epoll set


def raise_open_files_limit() -> int:
    """Raise our soft RLIMIT_NOFILE to the hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class LoadResult:
    """What one or more shards of a schedule did, as the runner reads it."""

    rate_per_s: float
    duration_s: float
    devices: int
    seq_base: int
    shards: int
    sent: int
    unsent: int  # slots never sent: the socket cap held them past the end
    answered: int
    late: int
    unanswered: int
    retransmissions: int
    send_errors: int
    codes: dict[str, int]
    max_open: int
    send_span_s: float  # first slot's time to the last send
    cpu_s: float  # this generator's own CPU, all shards
    latency: LogHistogram
    lag: LogHistogram
    acked: SlotSet

    @property
    def achieved_per_s(self) -> float:
        """Sends per second of the span they took (slot 0 to the last send): the rate when
        every send left on time."""
        return (self.sent - 1) / self.send_span_s if self.send_span_s > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        data = {k: v for k, v in vars(self).items() if k not in ("latency", "lag", "acked")}
        data.update(latency=self.latency.to_json(), lag=self.lag.to_json(),
                    acked=self.acked.to_json())
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LoadResult:
        plain = {k: v for k, v in data.items() if k not in ("latency", "lag", "acked")}
        return cls(**plain, latency=LogHistogram.from_json(data["latency"]),
                   lag=LogHistogram.from_json(data["lag"]), acked=SlotSet.from_json(data["acked"]))

    def merge(self, other: LoadResult) -> None:
        """Add another shard of the same schedule."""
        for name in ("sent", "unsent", "answered", "late", "unanswered", "retransmissions",
                     "send_errors", "max_open"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.send_span_s = max(self.send_span_s, other.send_span_s)
        self.cpu_s += other.cpu_s
        for code, n in other.codes.items():
            self.codes[code] = self.codes.get(code, 0) + n
        self.latency.merge(other.latency)
        self.lag.merge(other.lag)
        self.acked.union(other.acked)


def load_result(schedule: Schedule, out: Outcome, unsent: int, started_at: float,
                cpu_used_s: float) -> LoadResult:
    return LoadResult(
        rate_per_s=schedule.rate_per_s, duration_s=schedule.duration_s,
        devices=schedule.devices, seq_base=schedule.seq_base, shards=schedule.shards,
        sent=out.sent, unsent=unsent, answered=out.answered, late=out.late,
        unanswered=out.unanswered, retransmissions=out.retransmissions,
        send_errors=out.send_errors, codes=out.codes, max_open=out.max_open,
        send_span_s=round(out.last_send_at - started_at, 3) if out.sent else 0.0,
        cpu_s=round(cpu_used_s, 3), latency=out.latency, lag=out.lag, acked=out.acked)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--devices", type=int, default=40000)
    p.add_argument("--rate", type=float, required=True, help="uplinks/s of the whole schedule")
    p.add_argument("--duration", type=float, required=True, help="seconds of schedule")
    p.add_argument("--seq-base", type=int, default=0)
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--start-at", type=float, default=0.0,
                   help="wall-clock time (time.time()) of slot 0, so shards start together")
    p.add_argument("--give-up", type=float, default=10.0,
                   help="seconds the exchanges still open at the end may take")
    p.add_argument("--path-prefix", default="up")
    p.add_argument("--device-ids", type=Path, default=None,
                   help="send from these devices only (indices, one a line; replaces --devices)")
    args = p.parse_args(argv)
    ids = (tuple(int(line) for line in args.device_ids.read_text().split())
           if args.device_ids else ())
    schedule = Schedule(args.rate, args.duration, len(ids) or args.devices, args.seq_base,
                        args.shard, args.shards, ids)
    max_open = max(100, raise_open_files_limit() - 100)
    fleet = OpenLoopFleet(args.host, args.port, schedule,
                          tuple(s for s in args.path_prefix.split("/") if s), max_open,
                          args.give_up, random.Random())
    start_at = time.monotonic() + max(0.0, args.start_at - time.time())
    cpu_before = cpu_s()
    outcome, unsent = fleet.run(start_at)
    result = load_result(schedule, outcome, unsent, start_at, cpu_s() - cpu_before)
    json.dump(result.to_json(), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
