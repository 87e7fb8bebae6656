"""What the fleet bench and the soak read about a running gateway: from /proc (CPU, RSS,
bytes written to disk, open files) and from its /metrics (spool commits, ack latency
histogram, spool depth), as snapshots whose differences are the figures of a run.

Read-only: it never changes the gateway, and it defines no metrics of its own.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.tools.localstack import LOOPBACK, cpu_s, http_get, process_tree

NS = "nbiot_gateway_"


def write_bytes(pid: int) -> int:
    """Bytes the process and its children caused to be written to storage (write_bytes of
    /proc/<pid>/io: page cache pages dirtied, counted when dirtied, so a page rewritten
    after each fsync counts each time)."""
    total = 0
    for p in process_tree(pid):
        for line in Path(f"/proc/{p}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                total += int(line.split()[1])
    return total


def rss_mb(pid: int) -> float:
    """Resident set size (VmRSS) of the process and its children."""
    total_kb = 0
    for p in process_tree(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


def open_files(pid: int) -> int:
    """File descriptors open in the process and its children (/proc/<pid>/fd)."""
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in process_tree(pid))


def filesystem_of(path: Path) -> str:
    """`type (device)` of the mount holding `path`, from /proc/self/mountinfo: the bytes
    written are only meaningful on a real disk (tmpfs writes nothing)."""
    best, found = "", "unknown"
    resolved = str(path.resolve())
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        mount_point = before.split()[4]
        fs_type, device = after.split()[:2]
        inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, found = mount_point, f"{fs_type} ({device})"
    return found


@dataclass
class MetricsScrape:
    """The figures of one /metrics scrape the bench reads (missing ones are 0)."""

    commits: float = 0.0  # spool group commits, each one fsync
    committed_records: float = 0.0
    accepted: float = 0.0  # uplinks answered 2.04 after their commit
    spool_records: float = 0.0
    ack_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count


def scrape(metrics_port: int) -> MetricsScrape | None:
    status, body = http_get(f"http://{LOOPBACK}:{metrics_port}/metrics")
    if status != 200:
        return None
    found = MetricsScrape()
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == NS + "spool_commit_seconds_count":
                found.commits = s.value
            elif s.name == NS + "spool_committed_records_total":
                found.committed_records = s.value
            elif s.name == NS + "uplinks_accepted_total":
                found.accepted = s.value
            elif s.name == NS + "spool_records":
                found.spool_records = s.value
            elif s.name == NS + "uplink_ack_seconds_bucket":
                found.ack_buckets[float(s.labels["le"])] = s.value
    return found


@dataclass
class Snapshot:
    """A gateway at one moment: its /proc figures and a /metrics scrape."""

    at: float
    cpu_s: float
    write_bytes: int
    rss_mb: float
    open_files: int
    metrics: MetricsScrape


def snapshot(pid: int, metrics_port: int) -> Snapshot:
    metrics = scrape(metrics_port)
    if metrics is None:
        raise OSError(f"the gateway's /metrics on port {metrics_port} does not answer")
    return Snapshot(time.monotonic(), cpu_s(pid), write_bytes(pid), rss_mb(pid),
                    open_files(pid), metrics)


def bucket_quantile_s(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Quantile `q` (0..1) of the observations between two scrapes of a Prometheus
    histogram, interpolated linearly within its bucket as PromQL's histogram_quantile
    does; inf when it lies past the last finite bound, 0 with no observations."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return 0.0
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if math.isinf(bound):
                return math.inf
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return math.inf
