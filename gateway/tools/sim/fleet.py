"""The asyncio engine that drives a fleet process's devices (all of the fleet, or its share
with --processes): wakes each device at its report time, caps how many are awake at once
(a source endpoint each), runs one Exchange per wake, and books every outcome in the Ledger.

Wakes gathered into ticks, not tasks: 40,000 sleeping devices are entries in a dict of
TICK_S slots, one loop timer per slot that has any. It never holds an endpoint for a
sleeping device (where an endpoint is a socket of its own, the fd limit here is 20,000).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import math
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.config import DeviceType, SimSection
from gateway.ingest.coap import numbers as C
from gateway.pipeline.registry import Device
from gateway.tools.sim import payloads
from gateway.tools.sim.exchange import Exchange, Link, Outcome, encode_request, request_options
from gateway.tools.sim.ledger import Ledger
from gateway.tools.sim.lwm2m import SEND_FORMATS, Lwm2mDevice, Lwm2mType, encode_send
from gateway.tools.sim.payloads import (
    ALWAYS_FAULTY,
    INTERMITTENT_FAULT_PROBABILITY,
    Fault,
    ReportEncoder,
    Sensor,
)
from gateway.tools.sim.radio import Coverage

# First seq of every device in this run: milliseconds since 2023-11-14, so a later run's
# seqs are above an earlier run's and the gateway's (device, seq) dedup never mistakes a
# new report for an old one (as long as a device sends under 1,000 reports a second).
SEQ_EPOCH_MS = 1_700_000_000_000
DEFAULT_LISTEN_S = 20.0  # the gateway's default lwm2m.awake_s
FAULTY_SHARE = {"steady": 0.01, "storm": 0.01, "faulty": 0.3}
# Device wakes due within one tick share a loop timer: a wake is up to this late, against
# radio latencies of 80 ms to 3 s. One timer per device cost a loop iteration per report
# (docs/decisions.md, "The simulator, second pass"); the gateway reads its socket in
# batches of its commit linger at these rates, so the ticks do not make it cheaper.
TICK_S = 0.010
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(slots=True)
class Report:
    """The report a device is trying to deliver (kept across 5.03 retries)."""

    seq: int
    content_format: int
    payload: bytes
    fault: Fault | None
    ack: str | None = None  # the downlink command this report confirms
    announced: bool = False  # the ledger has it (from its first transmission on)


@dataclass(slots=True)
class SimDevice:
    device_id: str  # the id it sends: for an unknown_id fault, one the registry lacks
    device_type: str
    token: str  # the token it sends
    interval_s: float
    coverage: Coverage
    content_format: int
    fault: Fault | None
    sensor: Sensor
    units: dict[str, str]
    source_ip: str
    seq: int
    mid: int
    request_options: bytes  # the CoAP options of its every uplink, encoded once
    encoder: ReportEncoder
    next_at: float = 0.0
    report: Report | None = None
    handle: asyncio.TimerHandle | None = None  # a retry after 5.03 / 4.29 (Max-Age)
    ticking: bool = False  # its next wake waits in the Fleet's ticks
    unconfirmed_command: str | None = None  # applied, to be confirmed in the next report
    speaks_lwm2m: bool = False  # chosen to be an LwM2M device (Register, Send on /dp), not /up
    lwm2m: Lwm2mDevice | None = None  # its LwM2M side, made with the Fleet


def per_device_addresses(target_host: str, mode: str) -> bool:
    """Whether each device sends from a loopback address of its own: with
    sim.source_addresses "per_device" and the gateway on IPv4 loopback."""
    return _per_device(_ip_address(target_host), mode)


def _per_device(target: IPAddress | None, mode: str) -> bool:
    return mode == "per_device" and target is not None and target.version == 4 and (
        target.is_loopback)


def _ip_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def source_address(target_host: str, index: int, mode: str) -> str:
    """The device's own loopback address (127.1.0.1, 127.1.0.2, ...) when the gateway is on
    IPv4 loopback: every device its own endpoint, as behind a carrier NAT; otherwise the
    host's address for the target's family."""
    target = _ip_address(target_host)
    if _per_device(target, mode):
        return str(ipaddress.IPv4Address(0x7F010001 + index))
    if target is not None and target.version == 6:
        return "::1" if target.is_loopback else "::"
    return "127.0.0.1" if target is not None and target.is_loopback else "0.0.0.0"


def build_devices(
    registry_devices: Sequence[Device],
    types: dict[str, DeviceType],
    sim: SimSection,
    rng: random.Random,
    *,
    now_s: float,
    first_index: int = 0,
) -> list[SimDevice]:
    """The simulated fleet: one SimDevice per registry row, a share of them faulty.
    `first_index` is the fleet-wide index of the first row (a process's share of a fleet
    split by index): it picks each device's own source address."""
    share = sim.faulty_share if sim.faulty_share is not None else FAULTY_SHARE[sim.profile]
    n = len(registry_devices)
    faulty_idx = set(rng.sample(range(n), round(n * share)))
    kinds = list(Fault)
    first_seq = int(time.time() * 1000) - SEQ_EPOCH_MS
    formats = [payloads.CONTENT_FORMATS[f] for f in sim.formats]
    units = {name: {f: s.unit for f, s in spec.fields.items()} for name, spec in types.items()}
    fleet: list[SimDevice] = []
    fault_counter = 0
    lwm2m_idx = lwm2m_devices(registry_devices, types, faulty_idx, sim.lwm2m_share, rng)
    for i, dev in enumerate(registry_devices):
        spec = types[dev.device_type]
        fault: Fault | None = None
        if i in faulty_idx:
            fault = kinds[fault_counter % len(kinds)]
            fault_counter += 1
            if fault is Fault.OUT_OF_RANGE and not payloads.has_bounded_field(spec):
                fault = Fault.MALFORMED
        device_id = f"unregistered-{dev.device_id}" if fault is Fault.UNKNOWN_ID else dev.device_id
        token = dev.token + "x" if fault is Fault.WRONG_TOKEN else dev.token
        coverage = rng.choices(list(Coverage), weights=sim.coverage_shares)[0]
        content_format = rng.choice(formats)
        fleet.append(SimDevice(
            device_id=device_id,
            device_type=dev.device_type,
            token=token,
            interval_s=sim.interval_s or float(dev.report_interval_s),
            coverage=coverage,
            content_format=content_format,
            fault=fault,
            sensor=Sensor(dev.device_type, spec, rng, now_s),
            units=units[dev.device_type],
            source_ip=source_address(sim.host, first_index + i, sim.source_addresses),
            seq=first_seq,
            mid=rng.getrandbits(16),
            request_options=request_options(device_id, token, content_format),
            encoder=ReportEncoder(content_format, device_id, units[dev.device_type]),
        ))
        if i in lwm2m_idx:
            fleet[-1].speaks_lwm2m = True
            fleet[-1].content_format = rng.choice(SEND_FORMATS)
            fleet[-1].seq = 0  # the last Send's reading time in ms
    return fleet


def lwm2m_devices(registry_devices: Sequence[Device], types: dict[str, DeviceType],
                  faulty_idx: set[int], share: float, rng: random.Random) -> set[int]:
    """Which devices speak LwM2M: `share` of the fleet, drawn among the healthy devices of
    the types that map their fields to LwM2M resources (`[types.X.lwm2m] fields`); fewer
    when there are not that many."""
    if share <= 0:
        return set()
    eligible = [i for i, dev in enumerate(registry_devices) if i not in faulty_idx
                and (spec := types[dev.device_type].lwm2m) is not None
                and set(spec.fields) == set(types[dev.device_type].fields)]
    return set(rng.sample(eligible, min(len(eligible), round(len(registry_devices) * share))))


class Fleet:
    def __init__(
        self,
        devices: list[SimDevice],
        link: Link,
        ledger: Ledger,
        sim: SimSection,
        types: dict[str, DeviceType],
        *,
        max_awake: int,
        max_payload_bytes: int,
    ) -> None:
        self.devices = devices
        self.link = link
        self.ledger = ledger
        self.sim = sim
        self.types = types
        self.max_awake = max_awake
        self.max_payload_bytes = max_payload_bytes
        self.rng = link.rng
        self.loop = link.loop
        self.awake = 0
        self.awake_peak = 0
        self.waiting: deque[SimDevice] = deque()
        self.exchanges: set[Exchange | Lwm2mDevice] = set()
        self.stopping = False
        self._idle = asyncio.Event()
        self._end_at = float("inf")
        self._ticks: dict[int, list[SimDevice]] = {}  # tick number -> devices waking then
        self._tick_timers: dict[int, asyncio.TimerHandle] = {}
        kinds: dict[str, Lwm2mType] = {}
        listen_s = sim.lwm2m_listen_s if sim.lwm2m_listen_s is not None else DEFAULT_LISTEN_S
        for device in devices:
            if not device.speaks_lwm2m:
                ledger.first_seq(device.device_id, device.seq)
                continue
            ledger.sparse_seqs(device.device_id)
            kind = kinds.get(device.device_type)
            if kind is None:
                spec = types[device.device_type].lwm2m
                assert spec is not None
                kind = kinds[device.device_type] = Lwm2mType.of(spec.fields)
            device.lwm2m = Lwm2mDevice(device, kind, device.content_format, link, ledger, listen_s)
            device.lwm2m.on_interval = functools.partial(self._interval_changed, device)

    # -- the run ---------------------------------------------------------------------
    def start(self, duration_s: float) -> None:
        """Schedule every device's first report: at a random phase of its interval, or for
        profile storm all within storm_window_s (as after a network outage)."""
        now = self.loop.time()
        self._end_at = now + duration_s
        storm = self.sim.profile == "storm"
        for device in self.devices:
            window = self.sim.storm_window_s if storm else device.interval_s
            device.next_at = now + self.rng.uniform(0, window)
            if device.next_at < self._end_at:
                self._wake_at(device)

    def stop(self) -> None:
        """No new reports from now on; reports waiting for a retry are abandoned."""
        self.stopping = True
        for timer in self._tick_timers.values():
            timer.cancel()
        self._tick_timers.clear()
        self._ticks.clear()
        for device in self.devices:
            if device.handle is not None:
                device.handle.cancel()
                device.handle = None
                self._abandon(device)
            elif device.ticking:
                device.ticking = False
                self._abandon(device)
        while self.waiting:
            self._abandon(self.waiting.popleft())
        if not self.exchanges:
            self._idle.set()

    async def drain(self, timeout_s: float) -> None:
        """Let exchanges in flight finish, at most `timeout_s`; then abort the rest."""
        if self.exchanges:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)
        for exchange in list(self.exchanges):
            exchange.finish(Outcome.ABORTED)
        for device in self.devices:
            if device.lwm2m is not None:
                device.lwm2m.close()  # listening still: the run is over

    def _abandon(self, device: SimDevice) -> None:
        report, device.report = device.report, None
        if report is not None and report.announced:
            self.ledger.report_given_up((device.device_id, report.seq), "abandoned")

    # -- one device ------------------------------------------------------------------
    def _wake_at(self, device: SimDevice) -> None:
        """Wake `device` at the first tick not before its `next_at`."""
        tick = math.ceil(device.next_at / TICK_S)
        devices = self._ticks.get(tick)
        if devices is None:
            self._ticks[tick] = [device]
            self._tick_timers[tick] = self.loop.call_at(tick * TICK_S, self._tick, tick)
        else:
            devices.append(device)
        device.ticking = True

    def _tick(self, tick: int) -> None:
        del self._tick_timers[tick]
        for device in self._ticks.pop(tick):
            device.ticking = False
            self._wake(device)

    def _wake(self, device: SimDevice) -> None:
        device.handle = None
        if self.stopping:
            return
        if device.report is None:
            device.report = self._new_report(device)
        if self.awake >= self.max_awake:
            self.waiting.append(device)  # radio access delay: the cell is busy
            return
        self._begin(device)

    def _new_report(self, device: SimDevice) -> Report:
        if device.lwm2m is not None:
            return self._new_lwm2m_report(device, device.lwm2m)
        seq = device.seq
        device.seq += 1
        now_s = time.time()
        values = device.sensor.read(now_s)
        fault = device.fault
        if fault is not None and fault not in ALWAYS_FAULTY and (
                self.rng.random() >= INTERMITTENT_FAULT_PROBABILITY):
            fault = None
        if fault is Fault.OUT_OF_RANGE:
            values = payloads.out_of_range(values, self.types[device.device_type])
        ack = device.unconfirmed_command
        payload = device.encoder.encode(seq, int(now_s), values, ack)
        if fault is Fault.MALFORMED:
            payload = payloads.malformed(payload)
        elif fault is Fault.OVERSIZED:
            payload = payloads.oversized(payload, self.max_payload_bytes)
        return Report(seq, device.content_format, payload, fault, ack)

    def _new_lwm2m_report(self, device: SimDevice, lwm2m: Lwm2mDevice) -> Report:
        """A Send: its seq is the reading time in ms, as the gateway makes it from `bt`
        (one ms past the last one at least, so two reports never share a seq)."""
        now_s = time.time()
        seq = device.seq = max(int(now_s * 1000), device.seq + 1)
        values = device.sensor.read(now_s)
        lwm2m.readings = values
        return Report(seq, device.content_format,
                      encode_send(lwm2m.kind, device.content_format, seq, values), None)

    def _begin(self, device: SimDevice) -> None:
        report = device.report
        assert report is not None
        self.awake += 1
        self.awake_peak = max(self.awake_peak, self.awake)
        if device.lwm2m is not None:
            self._begin_lwm2m(device, device.lwm2m, report)
            return
        device.mid = (device.mid + 1) & 0xFFFF
        token = self.rng.getrandbits(32).to_bytes(4, "big")
        request = encode_request(device.mid, token, device.request_options, report.payload)
        exchange = Exchange(self.link, source_ip=device.source_ip, coverage=device.coverage,
                            mid=device.mid, token=token, request=request,
                            on_done=lambda ex: self._done(device, ex))
        self.exchanges.add(exchange)
        exchange.start()
        if not report.announced:
            report.announced = True
            # Loop time is CLOCK_MONOTONIC, the witness's clock for arrivals.
            self.ledger.report_sent((device.device_id, report.seq), exchange.started_at,
                                    report.fault)

    def _begin_lwm2m(self, device: SimDevice, lwm2m: Lwm2mDevice, report: Report) -> None:
        def sent() -> None:  # its Send's first transmission (after a Register or Update)
            if not report.announced:
                report.announced = True
                self.ledger.report_sent((device.device_id, report.seq), lwm2m.started_at, None,
                                        lwm2m=True)

        self.exchanges.add(lwm2m)
        lwm2m.report(report.payload, sent, lambda ex: self._done(device, ex))

    def _done(self, device: SimDevice, exchange: Exchange | Lwm2mDevice) -> None:
        self.awake -= 1
        self.exchanges.discard(exchange)
        ledger = self.ledger
        ledger.transmissions += exchange.transmissions
        ledger.retransmissions += exchange.retransmissions
        ledger.nat_rebinds += exchange.rebinds
        ledger.stale_replies += exchange.stale_replies
        report = device.report
        assert report is not None
        key = (device.device_id, report.seq)
        outcome = exchange.outcome
        now = exchange.finished_at
        if outcome is Outcome.UNAVAILABLE and not self.stopping:
            if exchange.code == C.TOO_MANY_REQUESTS:
                ledger.rate_limited += 1
            else:
                ledger.service_unavailable += 1
            # Max-Age says when to come back; a little jitter so the fleet does not return
            # in one burst.
            retry_in = exchange.max_age_s * (1 + self.rng.uniform(0, 0.1))
            device.handle = self.loop.call_later(retry_in, self._wake, device)
        else:
            device.report = None
            if outcome is Outcome.ACKED:
                ledger.report_acked(key, now, exchange.started_at)
                if report.ack is not None and report.ack == device.unconfirmed_command:
                    device.unconfirmed_command = None
                if exchange.reply_payload:
                    self._apply_command(device, exchange.reply_payload)
            elif outcome is Outcome.REJECTED or outcome is Outcome.UNAVAILABLE:
                ledger.report_rejected(key, C.code_str(exchange.code), report.fault)
            elif outcome is Outcome.RESET:
                ledger.report_given_up(key, "reset")
            elif outcome is Outcome.TIMEOUT:
                ledger.report_given_up(key, "timeout")
            else:
                ledger.report_given_up(key, "abandoned")
            self._schedule_next(device, now)
        while self.waiting and self.awake < self.max_awake and not self.stopping:
            self._begin(self.waiting.popleft())
        if self.stopping and not self.exchanges:
            self._idle.set()

    def _apply_command(self, device: SimDevice, payload: bytes) -> None:
        """A downlink command in the 2.04: apply what the device knows (its report
        interval), and confirm it with `ack` in the next report."""
        try:
            command = json.loads(payload)
        except ValueError:
            return
        if not isinstance(command, dict) or not isinstance(command.get("id"), str):
            return
        if command["id"] == device.unconfirmed_command:
            return  # the same command again: our confirmation is on its way
        settings = command.get("set")
        interval = settings.get("report_interval_s") if isinstance(settings, dict) else None
        if isinstance(interval, int | float) and not isinstance(interval, bool) and interval > 0:
            device.interval_s = float(interval)
        device.unconfirmed_command = command["id"]
        self.ledger.downlinks_applied += 1

    def _interval_changed(self, device: SimDevice) -> None:
        """A Write of the interval: a next report scheduled further out than the new
        interval comes earlier (pmax: the longest the device may stay silent)."""
        soonest = self.loop.time() + device.interval_s
        if not device.ticking or device.report is not None or device.next_at <= soonest:
            return  # a report in flight (or a retry): the next one is scheduled from its end
        tick = math.ceil(device.next_at / TICK_S)
        waking = self._ticks.get(tick)
        if waking is None or device not in waking:
            return
        waking.remove(device)
        if not waking:
            del self._ticks[tick]
            self._tick_timers.pop(tick).cancel()
        device.next_at = soonest
        self._wake_at(device)

    def _schedule_next(self, device: SimDevice, now: float) -> None:
        if self.stopping:
            return
        jitter = self.sim.jitter
        device.next_at += device.interval_s * (1 + self.rng.uniform(-jitter, jitter))
        device.next_at = max(device.next_at, now)
        if device.next_at < self._end_at:
            self._wake_at(device)
