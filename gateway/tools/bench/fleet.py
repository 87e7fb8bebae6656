"""`nbiot-gateway bench --profile fleet`: the gateway at the plant's shape, then saturated.

40,000 sleeping devices, each uplink from a fresh UDP socket, sent open loop at fixed
rates (667/s: a report a minute each; 4,000/s: every 10 s), then the default profile's
closed loop at saturation, all against one gateway and broker. Per rate it reads the
gateway's CPU, bytes written to disk, spool commits and ack latency (from /proc and its
/metrics) and checks every acked uplink on MQTT. Figures only: it asserts nothing but
that nothing acked was lost (exit 1).
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.tools.bench.loadgen import write_bench_registry
from gateway.tools.bench.openload import LoadResult, SlotSet
from gateway.tools.bench.probe import Snapshot, bucket_quantile_s, filesystem_of, snapshot
from gateway.tools.bench.runner import MOSQUITTO_CONF, loadgen, machine
from gateway.tools.bench.witness import SEQ_SPAN, StreamWitness, Tally, stream_witness
from gateway.tools.localstack import (
    LOAD_ENV,
    LOOPBACK,
    coap_answers,
    free_port,
    gateway,
    gateway_env,
    metric_sample,
    mosquitto,
    wait_until,
)

DEFAULT_DEVICES = 40_000
DEFAULT_RATES = (667.0, 4000.0)
DEFAULT_DURATION_S = 45.0
SATURATION_ENDPOINTS = 2000  # the default profile's closed loop
WARMUP_RATE_PER_S = 4000.0
GIVE_UP_S = 10.0  # exchanges still open when a schedule ends get this long
DRAIN_TIMEOUT_S = 120.0
DELIVERY_TIMEOUT_S = 30.0
# The loader is said to keep up when it sent its whole schedule at >= 99 % of the rate
# with its own lag behind the schedule at p99 under this.
KEPT_UP_LAG_P99_S = 0.050


# -- the stack ----------------------------------------------------------------------------
@dataclass(frozen=True)
class FleetStack:
    """One broker, the streaming witness and one gateway, for every run of a bench."""

    workdir: Path
    gateway_pid: int
    coap_port: int
    metrics_port: int
    witness: StreamWitness

    def snapshot(self) -> Snapshot:
        return snapshot(self.gateway_pid, self.metrics_port)

    def wait_drained(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        wait_until(lambda: metric_sample(self.metrics_port, "nbiot_gateway_spool_records") == 0,
                   timeout_s, "the spool to drain")


@contextlib.contextmanager
def fleet_stack(workdir: Path, devices: int, report_interval_s: int) -> Iterator[FleetStack]:
    registry = workdir / "devices.csv"
    write_bench_registry(registry, devices, report_interval_s=report_interval_s)
    coap_port, metrics_port = free_port(socket.SOCK_DGRAM), free_port()
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(mosquitto(workdir, MOSQUITTO_CONF, name="fleet-mosquitto"))
        witness = stack.enter_context(stream_witness(broker.port, workdir / "witness.log"))
        env = {**gateway_env(broker_port=broker.port, coap_port=coap_port,
                             metrics_port=metrics_port, spool=workdir / "spool.sqlite",
                             registry=registry),
               **LOAD_ENV, "NBIOT_GATEWAY__TENANT": "bench", "NBIOT_GATEWAY__WORKERS": "1"}
        gw = stack.enter_context(gateway(env, workdir / "gateway.log",
                                         lambda: coap_answers(coap_port)))
        wait_until(lambda: metric_sample(metrics_port, "nbiot_gateway_mqtt_connected") == 1, 20,
                   "the gateway's broker connection")
        yield FleetStack(workdir, gw.pid, coap_port, metrics_port, witness)


# -- the open-loop load generator, in one or more processes -------------------------------
class OpenLoopRun:
    """`gateway.tools.bench.openload` in `procs` processes sharing one schedule, against `host`;
    each command line after `wrap` (`ip netns exec NS`: in a lab's namespace)."""

    def __init__(self, port: int, devices: int, rate_per_s: float, duration_s: float,
                 seq_base: int, procs: int, log_path: Path, give_up_s: float = GIVE_UP_S,
                 *, host: str = LOOPBACK, wrap: Sequence[str] = (),
                 device_ids: Path | None = None) -> None:
        self.duration_s = duration_s
        self.timeout_s = duration_s + give_up_s + 60
        start_at = time.time() + 1.0  # every shard imported and waiting by then
        self.started_at = time.monotonic() + 1.0  # the schedule's slot 0, on our clock
        self.procs: list[subprocess.Popen[bytes]] = []
        with log_path.open("ab") as log:
            for shard in range(procs):
                ids = () if device_ids is None else ("--device-ids", str(device_ids))
                self.procs.append(subprocess.Popen(
                    [*wrap, sys.executable, "-m", "gateway.tools.bench.openload", *ids,
                     "--host", host, "--port", str(port),
                     "--devices", str(devices), "--rate", str(rate_per_s), "--duration",
                     str(duration_s), "--seq-base", str(seq_base), "--shard", str(shard),
                     "--shards", str(procs), "--start-at", str(start_at),
                     "--give-up", str(give_up_s)], stdout=subprocess.PIPE, stderr=log))

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def wait(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for every shard to exit; whether they have."""
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
        return not self.running()

    def result(self) -> LoadResult:
        merged: LoadResult | None = None
        for p in self.procs:
            out, _ = p.communicate(timeout=self.timeout_s)
            if p.returncode != 0:
                raise RuntimeError(f"the load generator exited with {p.returncode}")
            part = LoadResult.from_json(json.loads(out))
            if merged is None:
                merged = part
            else:
                merged.merge(part)
        assert merged is not None
        return merged

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# -- one run ------------------------------------------------------------------------------
@dataclass
class LoadFigures:
    """What the load generator offered and saw (the device side)."""

    shape: str
    offered_per_s: float | None  # None: closed loop
    duration_s: float
    devices: int
    loadgen_procs: int
    achieved_per_s: float
    lag_p50_ms: float | None  # the generator's sends behind their schedule
    lag_p99_ms: float | None
    lag_max_ms: float | None
    kept_up: bool | None
    loadgen_cpu_us_per_uplink: float | None
    sent: int
    acked: int  # answered 2.04
    late: int | None  # answered after ACK_TIMEOUT (2 s); None: not counted (closed loop)
    unanswered: int
    retransmissions: int
    codes: dict[str, int]
    device_p50_ms: float
    device_p99_ms: float


@dataclass
class GatewayFigures:
    """The gateway's cost over the run (/proc and /metrics deltas), per uplink acked."""

    accepted: int
    cpu_ms_per_uplink: float
    disk_bytes_per_uplink: float
    fsyncs_per_s: float
    records_per_commit: float
    ack_p50_ms: float | None  # None: past the histogram's last bound (5 s)
    ack_p99_ms: float | None


@dataclass
class Delivery:
    delivered: int
    lost: int
    duplicates_on_mqtt: int
    mqtt_message_bytes: float  # mean topic + payload


@dataclass
class FleetResult:
    name: str
    load: LoadFigures
    gateway: GatewayFigures
    delivery: Delivery

    @property
    def disk_per_message(self) -> float:
        return _ratio(self.gateway.disk_bytes_per_uplink, self.delivery.mqtt_message_bytes)

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "disk_per_message": self.disk_per_message}


def _ms(value_s: float) -> float | None:
    return round(value_s * 1000, 2) if math.isfinite(value_s) else None


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else 0.0


def gateway_figures(before: Snapshot, after: Snapshot, acked: int, window_s: float
                    ) -> GatewayFigures:
    commits = after.metrics.commits - before.metrics.commits
    records = after.metrics.committed_records - before.metrics.committed_records
    b, a = before.metrics.ack_buckets, after.metrics.ack_buckets
    return GatewayFigures(
        accepted=int(after.metrics.accepted - before.metrics.accepted),
        cpu_ms_per_uplink=round((after.cpu_s - before.cpu_s) / acked * 1000, 4) if acked else 0.0,
        disk_bytes_per_uplink=round((after.write_bytes - before.write_bytes) / acked, 1)
        if acked else 0.0,
        fsyncs_per_s=round(commits / window_s, 1) if window_s else 0.0,
        records_per_commit=round(records / commits, 2) if commits else 0.0,
        ack_p50_ms=_ms(bucket_quantile_s(b, a, 0.50)),
        ack_p99_ms=_ms(bucket_quantile_s(b, a, 0.99)))


def delivery(witness: StreamWitness, tally: Tally, acked: SlotSet) -> Delivery:
    lost = witness.wait_delivered(tally, acked, DELIVERY_TIMEOUT_S)
    return Delivery(delivered=len(acked) - lost, lost=lost, duplicates_on_mqtt=tally.duplicates,
                    mqtt_message_bytes=round(tally.mean_message_bytes, 1))


def open_loop_figures(load: LoadResult, procs: int) -> LoadFigures:
    lag_p99_s = load.lag.quantile_s(0.99)
    return LoadFigures(
        shape="open loop, fresh socket per uplink", offered_per_s=load.rate_per_s,
        duration_s=load.duration_s, devices=load.devices, loadgen_procs=procs,
        achieved_per_s=round(load.achieved_per_s, 1),
        lag_p50_ms=_ms(load.lag.quantile_s(0.5)), lag_p99_ms=_ms(lag_p99_s),
        lag_max_ms=_ms(load.lag.max_s()),
        kept_up=(load.unsent == 0 and load.achieved_per_s >= 0.99 * load.rate_per_s
                 and lag_p99_s <= KEPT_UP_LAG_P99_S),
        loadgen_cpu_us_per_uplink=round(load.cpu_s / load.sent * 1e6, 1) if load.sent else 0.0,
        sent=load.sent, acked=len(load.acked), late=load.late,
        unanswered=load.unanswered + load.unsent, retransmissions=load.retransmissions,
        codes=load.codes, device_p50_ms=_ms(load.latency.quantile_s(0.5)) or 0.0,
        device_p99_ms=_ms(load.latency.quantile_s(0.99)) or 0.0)


def open_loop_run(stack: FleetStack, name: str, rate_per_s: float, duration_s: float,
                  devices: int, seq_base: int, procs: int) -> FleetResult:
    tally = stack.witness.track(seq_base, devices)
    before = stack.snapshot()
    run = OpenLoopRun(stack.coap_port, devices, rate_per_s, duration_s, seq_base, procs,
                      stack.workdir / "openload.log")
    try:
        load = run.result()
    finally:
        run.stop()
    stack.wait_drained()
    after = stack.snapshot()
    return FleetResult(name, open_loop_figures(load, procs),
                       gateway_figures(before, after, len(load.acked), duration_s),
                       delivery(stack.witness, tally, load.acked))


def saturated_run(stack: FleetStack, duration_s: float, endpoints: int, seq_base: int
                  ) -> FleetResult:
    """The default profile's closed loop (fixed endpoints, the next uplink as soon as the
    last is answered), against the same gateway."""
    tally = stack.witness.track(seq_base, endpoints)
    before = stack.snapshot()
    load = loadgen(stack.coap_port, endpoints, duration_s, seq_base=seq_base)
    stack.wait_drained()
    after = stack.snapshot()
    acked = SlotSet()
    for device, seq in load["acked"]:
        acked.add((seq - seq_base - 1) * endpoints + device)
    window_s = float(load["duration_s"])
    figures = LoadFigures(
        shape="closed loop, fixed endpoints", offered_per_s=None, duration_s=window_s,
        devices=endpoints, loadgen_procs=1, achieved_per_s=float(load["rate_per_s"]),
        lag_p50_ms=None, lag_p99_ms=None, lag_max_ms=None, kept_up=None,
        loadgen_cpu_us_per_uplink=None, sent=int(load["sent"]), acked=len(acked), late=None,
        unanswered=int(load["unanswered"]), retransmissions=int(load["retransmissions"]),
        codes=dict(load["codes"]), device_p50_ms=float(load["ack_latency_ms"]["p50"]),
        device_p99_ms=float(load["ack_latency_ms"]["p99"]))
    return FleetResult("saturated", figures,
                       gateway_figures(before, after, len(acked), window_s),
                       delivery(stack.witness, tally, acked))


# -- the profile --------------------------------------------------------------------------
def _rate_name(rate_per_s: float) -> str:
    return f"{rate_per_s:,.0f}/s"


def _fmt(value: float | None, spec: str = ",.1f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _pair_ms(p50: float | None, p99: float | None) -> str:
    """`p50 / p99`; a gateway quantile past the histogram's last bound reads >5000."""
    return f"{_fmt(p50, none='>5000')} / {_fmt(p99, none='>5000')}"


def print_tables(results: Sequence[FleetResult]) -> None:
    head = (f"{'load':<12}{'offered/s':>10}{'achieved/s':>12}{'lag p50/p99/max ms':>21}"
            f"{'kept up':>9}{'lg us/up':>10}{'sent':>10}{'acked':>10}{'late':>7}"
            f"{'unanswered':>12}{'lost':>6}")
    print(head)
    print("-" * len(head))
    for r in results:
        ld = r.load
        lag = ("-" if ld.lag_p50_ms is None else
               f"{_fmt(ld.lag_p50_ms)} / {_fmt(ld.lag_p99_ms)} / {_fmt(ld.lag_max_ms)}")
        kept = "-" if ld.kept_up is None else ("yes" if ld.kept_up else "NO")
        late = "-" if ld.late is None else f"{ld.late:,}"
        print(f"{r.name:<12}{_fmt(ld.offered_per_s, ',.0f'):>10}{ld.achieved_per_s:>12,.1f}"
              f"{lag:>21}{kept:>9}{_fmt(ld.loadgen_cpu_us_per_uplink, '.0f'):>10}"
              f"{ld.sent:>10,}{ld.acked:>10,}{late:>7}{ld.unanswered:>12,}"
              f"{r.delivery.lost:>6,}")
    head = (f"{'gateway':<12}{'cpu ms/up':>10}{'disk B/up':>11}{'MQTT msg B':>12}"
            f"{'disk/msg':>10}{'fsync/s':>9}{'rec/commit':>12}{'gw ack p50/p99 ms':>20}"
            f"{'device p50/p99 ms':>20}")
    print("\n" + head)
    print("-" * len(head))
    for r in results:
        gw, ld = r.gateway, r.load
        print(f"{r.name:<12}{gw.cpu_ms_per_uplink:>10.3f}{gw.disk_bytes_per_uplink:>11,.0f}"
              f"{r.delivery.mqtt_message_bytes:>12,.0f}{r.disk_per_message:>10.1f}"
              f"{gw.fsyncs_per_s:>9,.0f}{gw.records_per_commit:>12,.1f}"
              f"{_pair_ms(gw.ack_p50_ms, gw.ack_p99_ms):>20}"
              f"{_pair_ms(ld.device_p50_ms, ld.device_p99_ms):>20}")


def fleet_ratios(results: Sequence[FleetResult]) -> dict[str, float]:
    """CPU and disk bytes per uplink of each paced run over the saturated run (the last)."""
    saturated = results[-1].gateway
    ratios: dict[str, float] = {}
    for r in results[:-1]:
        ratios[f"cpu {r.name} / saturated"] = _ratio(r.gateway.cpu_ms_per_uplink,
                                                     saturated.cpu_ms_per_uplink)
        ratios[f"disk {r.name} / saturated"] = _ratio(r.gateway.disk_bytes_per_uplink,
                                                      saturated.disk_bytes_per_uplink)
    return ratios


def run_fleet_bench(devices: int = DEFAULT_DEVICES, rates: Sequence[float] = DEFAULT_RATES,
                    duration_s: float = DEFAULT_DURATION_S, json_out: Path | None = None,
                    loadgen_procs: int = 1) -> int:
    endpoints = min(devices, SATURATION_ENDPOINTS)
    with tempfile.TemporaryDirectory(prefix="nbiot-bench-fleet-") as tmp:
        workdir = Path(tmp)
        filesystem = filesystem_of(workdir)
        # No device may go offline between runs: its status record would count against
        # the uplinks. The interval only drives liveness; the load sets the real one.
        with fleet_stack(workdir, devices, report_interval_s=3600) as stack:
            # Every device once, unmeasured: the plant's gateway knows its devices, and a
            # first uplink costs more (liveness status, replay state row).
            warmup_rate = min(WARMUP_RATE_PER_S, float(devices))
            warmup = open_loop_run(stack, "warm-up", warmup_rate, devices / warmup_rate,
                                   devices, 0, loadgen_procs)
            results = [open_loop_run(stack, _rate_name(rate), rate, duration_s, devices,
                                     (n + 1) * SEQ_SPAN, loadgen_procs)
                       for n, rate in enumerate(rates)]
            results.append(saturated_run(stack, duration_s, endpoints,
                                         (len(rates) + 1) * SEQ_SPAN))
    print(f"\nnbiot-gateway bench --profile fleet: {devices:,} devices, open loop with a fresh "
          f"UDP socket per uplink, {duration_s:g} s per rate; then saturation (closed loop, "
          f"{endpoints:,} fixed endpoints); one gateway and broker throughout")
    print(f"machine: {machine()}")
    print(f"spool on {filesystem}; load generator: {loadgen_procs} process(es), epoll, "
          f"RFC 7252 CON retransmission")
    print(f"warm-up (every device once, not measured): {warmup.load.sent:,} sent, "
          f"{warmup.load.acked:,} acked, lost {warmup.delivery.lost}\n")
    print_tables(results)
    ratios = fleet_ratios(results)
    print("\nratios: " + ", ".join(f"{k} = {v}" for k, v in ratios.items()))
    print("disk bytes per uplink / MQTT message size (target <= 4): " + ", ".join(
        f"{r.name} {r.disk_per_message:.1f}" for r in results))
    if json_out is not None:
        json_out.write_text(json.dumps({
            "profile": "fleet", "devices": devices, "rates": list(rates),
            "duration_s": duration_s, "machine": machine(), "filesystem": filesystem,
            "warmup": warmup.to_json(), "ratios": ratios,
            "results": [r.to_json() for r in results]}, indent=2))
        print(f"written to {json_out}")
    lost = warmup.delivery.lost + sum(r.delivery.lost for r in results)
    if lost:
        print(f"\nLOST: {lost} acknowledged uplinks never reached the broker", file=sys.stderr)
    return 1 if lost else 0
