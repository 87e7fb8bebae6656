"""`nbiot-gateway soak`: hours at the plant's shape (40,000 devices, a report a minute
each, every uplink from a fresh UDP socket), sampling the gateway's RSS, CPU, open files,
spool depth and disk writes, then a least-squares trend of each after a warm-up, read
against the issue's targets (RSS <= 10 MB/hour, open files and spool depth flat).

It asserts nothing but delivery (exit 1 if an acked uplink never reached the broker):
the verdicts are for a person to read, and a short run's slopes are extrapolations.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.tools.bench.fleet import (
    GIVE_UP_S,
    OpenLoopRun,
    delivery,
    fleet_stack,
    open_loop_figures,
)
from gateway.tools.bench.probe import Snapshot, filesystem_of
from gateway.tools.bench.runner import machine

# RSS may grow this much an hour after the warm-up (the target).
RSS_TARGET_MB_PER_H = 10.0
MIN_TREND_SAMPLES = 3


@dataclass
class Sample:
    t_s: float  # since the schedule's start
    rss_mb: float
    cpu_pct: float  # of one core, over the sample's interval
    open_files: int
    spool_records: float
    write_bytes_per_s: float
    uplinks_per_s: float  # accepted by the gateway over the interval
    cpu_ms_per_uplink: float
    disk_bytes_per_uplink: float


def sample(t_s: float, before: Snapshot, after: Snapshot) -> Sample:
    elapsed_s = after.at - before.at
    accepted = after.metrics.accepted - before.metrics.accepted
    cpu_s = after.cpu_s - before.cpu_s
    written = after.write_bytes - before.write_bytes
    return Sample(
        t_s=round(t_s, 1), rss_mb=round(after.rss_mb, 1),
        cpu_pct=round(cpu_s / elapsed_s * 100, 1) if elapsed_s else 0.0,
        open_files=after.open_files, spool_records=after.metrics.spool_records,
        write_bytes_per_s=round(written / elapsed_s) if elapsed_s else 0.0,
        uplinks_per_s=round(accepted / elapsed_s, 1) if elapsed_s else 0.0,
        cpu_ms_per_uplink=round(cpu_s / accepted * 1000, 3) if accepted else 0.0,
        disk_bytes_per_uplink=round(written / accepted) if accepted else 0.0)


def print_sample(s: Sample) -> None:
    print(f"t={s.t_s:>7,.0f}s  rss {s.rss_mb:7.1f} MB  cpu {s.cpu_pct:5.1f} % "
          f"({s.cpu_ms_per_uplink:.3f} ms/up)  files {s.open_files:4d}  "
          f"spool {s.spool_records:7,.0f}  disk {s.write_bytes_per_s / 1e6:7.2f} MB/s "
          f"({s.disk_bytes_per_uplink:,.0f} B/up)  uplinks {s.uplinks_per_s:7,.1f}/s", flush=True)


# -- trends -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Figure:
    """A sampled figure and when its trend counts as flat: the fitted change over the
    measured window within max(abs_tolerance, rel_tolerance * |mean|, per_hour_tolerance
    * the window in hours). With a target, the target is met unless it is growing."""

    name: str
    field: str
    unit: str
    abs_tolerance: float = 0.0
    rel_tolerance: float = 0.0
    per_hour_tolerance: float = 0.0
    target: str | None = None
    scale: float = 1.0  # the sample's field times this is in `unit`


@dataclass
class Trend:
    figure: str
    unit: str
    samples: int
    window_s: float
    mean: float
    slope_per_h: float
    change: float  # fitted over the window
    verdict: str  # flat | growing | shrinking | too few samples
    target: str | None
    met: bool | None


def figures(rate_per_s: float) -> list[Figure]:
    # A healthy spool holds what awaits its PUBACK: a sample catches up to ~0.1 s of uplinks.
    spool_tolerance = max(10.0, 0.1 * rate_per_s)
    return [
        Figure("RSS", "rss_mb", "MB", per_hour_tolerance=RSS_TARGET_MB_PER_H,
               target=f"<= {RSS_TARGET_MB_PER_H:g} MB/h"),
        Figure("open files", "open_files", "files", abs_tolerance=1.0, target="flat"),
        Figure("spool depth", "spool_records", "records", abs_tolerance=spool_tolerance,
               target="flat"),
        Figure("CPU", "cpu_pct", "% of a core", abs_tolerance=0.5, rel_tolerance=0.10),
        Figure("disk writes", "write_bytes_per_s", "MB/s", rel_tolerance=0.10, scale=1e-6),
    ]


def least_squares(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(slope, mean of ys) of the least-squares line through the points."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    return (sxy / sxx if sxx else 0.0), mean_y


def trend(figure: Figure, samples: Sequence[Sample], warmup_s: float) -> Trend:
    measured = [s for s in samples if s.t_s >= warmup_s]
    if len(measured) < MIN_TREND_SAMPLES:
        return Trend(figure.name, figure.unit, len(measured), 0.0, 0.0, 0.0, 0.0,
                     "too few samples", figure.target, None)
    xs = [s.t_s for s in measured]
    ys = [float(getattr(s, figure.field)) * figure.scale for s in measured]
    slope_per_s, mean = least_squares(xs, ys)
    window_s = xs[-1] - xs[0]
    change = slope_per_s * window_s
    tolerance = max(figure.abs_tolerance, figure.rel_tolerance * abs(mean),
                    figure.per_hour_tolerance * window_s / 3600)
    verdict = "flat" if abs(change) <= tolerance else ("growing" if change > 0 else "shrinking")
    slope_per_h = slope_per_s * 3600
    met = None if figure.target is None else verdict != "growing"
    return Trend(figure.name, figure.unit, len(measured), round(window_s, 1), round(mean, 2),
                 round(slope_per_h, 3), round(change, 3), verdict, figure.target, met)


def print_trend(t: Trend) -> None:
    if t.verdict == "too few samples":
        print(f"{t.figure:<12} too few samples after the warm-up ({t.samples})")
        return
    target = "" if t.target is None else (
        f"   target {t.target}: {'met' if t.met else 'NOT MET'}")
    print(f"{t.figure:<12} {t.verdict:<9} {t.slope_per_h:+10,.2f} {t.unit}/h "
          f"(mean {t.mean:,.2f} {t.unit}, {t.samples} samples over {t.window_s:,.0f} s)"
          f"{target}")


# -- the run ------------------------------------------------------------------------------
def run_soak(devices: int = 40000, interval_s: float = 60.0, duration_s: float = 7200.0,
             sample_s: float = 60.0, warmup_s: float = 600.0, json_out: Path | None = None,
             loadgen_procs: int = 1) -> int:
    rate_per_s = devices / interval_s
    warmup_s = min(warmup_s, duration_s / 3)  # a short run keeps two thirds for its trends
    print(f"nbiot-gateway soak: {devices:,} devices every {interval_s:g} s "
          f"({rate_per_s:,.1f} uplinks/s, a fresh UDP socket each), {duration_s:,.0f} s, "
          f"a sample every {sample_s:g} s, trends after {warmup_s:,.0f} s", flush=True)
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="nbiot-soak-") as tmp:
        workdir = Path(tmp)
        filesystem = filesystem_of(workdir)
        print(f"machine: {machine()}\nspool on {filesystem}\n", flush=True)
        with fleet_stack(workdir, devices, report_interval_s=max(1, math.ceil(interval_s))
                         ) as stack:
            tally = stack.witness.track(0, devices)
            run = OpenLoopRun(stack.coap_port, devices, rate_per_s, duration_s, 0,
                              loadgen_procs, workdir / "openload.log", GIVE_UP_S)
            try:
                previous = stack.snapshot()
                next_at = run.started_at + sample_s
                while next_at <= run.started_at + duration_s:
                    if run.wait(next_at - time.monotonic()):
                        break  # the generator ended early: its result says why
                    current = stack.snapshot()
                    samples.append(sample(current.at - run.started_at, previous, current))
                    print_sample(samples[-1])
                    previous, next_at = current, next_at + sample_s
                load = run.result()
            finally:
                run.stop()
            stack.wait_drained()
            delivered = delivery(stack.witness, tally, load.acked)
    trends = [trend(f, samples, warmup_s) for f in figures(rate_per_s)]
    figures_of_load = open_loop_figures(load, loadgen_procs)
    print(f"\nload: offered {rate_per_s:,.1f}/s, achieved {figures_of_load.achieved_per_s:,.1f}/s,"
          f" lag p50/p99/max {figures_of_load.lag_p50_ms} / {figures_of_load.lag_p99_ms} / "
          f"{figures_of_load.lag_max_ms} ms, kept up: {'yes' if figures_of_load.kept_up else 'NO'};"
          f" sent {load.sent:,}, acked {len(load.acked):,}, late {load.late:,}, unanswered "
          f"{load.unanswered + load.unsent:,}, lost {delivered.lost:,}, duplicates on MQTT "
          f"{delivered.duplicates_on_mqtt:,}; MQTT message {delivered.mqtt_message_bytes:,.0f} B")
    print(f"trends after {warmup_s:,.0f} s warm-up (least squares over the samples):")
    for t in trends:
        print_trend(t)
    if duration_s - warmup_s < 3600:
        print("(under an hour of samples: the slopes per hour are extrapolations)")
    if json_out is not None:
        json_out.write_text(json.dumps({
            "devices": devices, "interval_s": interval_s, "duration_s": duration_s,
            "sample_s": sample_s, "warmup_s": warmup_s, "machine": machine(),
            "filesystem": filesystem, "load": asdict(figures_of_load),
            "delivery": asdict(delivered), "samples": [asdict(s) for s in samples],
            "trends": [asdict(t) for t in trends]}, indent=2))
        print(f"written to {json_out}")
    if delivered.lost:
        print(f"\nLOST: {delivered.lost} acknowledged uplinks never reached the broker",
              file=sys.stderr)
    return 1 if delivered.lost else 0
