"""What the gateway says about itself during a run, read from its /metrics before the
fleet starts and after it ends: uplinks received, its CPU, and its own receive-to-2.04
histogram (`nbiot_gateway_uplink_ack_seconds`), so the summary can set them beside the
device-side figures.

Read-only, and optional: a gateway whose /metrics does not answer leaves these empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from gateway.config import MetricsSection
from gateway.tools.localstack import http_get

NS = "nbiot_gateway_"
WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


@dataclass(frozen=True)
class GatewayReading:
    uplinks_received: float
    cpu_s: float
    ack_buckets: tuple[tuple[float, float], ...]  # (upper bound s, cumulative count), +Inf last


def metrics_url(metrics: MetricsSection, sim_host: str) -> str | None:
    """The gateway's /metrics, from the `[metrics]` the simulator shares with it (a
    wildcard bind is reached at the simulator's target host)."""
    if not metrics.enabled:
        return None
    host = sim_host if metrics.bind in WILDCARDS else metrics.bind
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{metrics.port}/metrics"


def read_gateway(url: str | None) -> GatewayReading | None:
    if url is None:
        return None
    status, body = http_get(url)
    if status != 200:
        return None
    uplinks = cpu = 0.0
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == f"{NS}uplinks_received_total":
                uplinks = sample.value
            elif sample.name == "process_cpu_seconds_total":
                cpu = sample.value
            elif sample.name == f"{NS}uplink_ack_seconds_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
    return GatewayReading(uplinks, cpu, tuple(sorted(buckets)))


def ack_latency_ms(before: GatewayReading, after: GatewayReading) -> dict[str, float | None]:
    """p50/p95/p99 of the gateway's receive-to-2.04 time over the run, in ms, from the
    histogram's growth between the two readings: linear within a bucket, as Prometheus's
    histogram_quantile does, so no finer than its buckets (1, 2.5, 5, 10, 25 ms, ...)."""
    earlier = dict(before.ack_buckets)
    growth = [(bound, count - earlier.get(bound, 0.0)) for bound, count in after.ack_buckets]
    total = growth[-1][1] if growth else 0.0
    if total <= 0:
        return {"p50": None, "p95": None, "p99": None}
    return {f"p{q}": _quantile(growth, total, q / 100) for q in (50, 95, 99)}


def _quantile(growth: list[tuple[float, float]], total: float, q: float) -> float:
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in growth:
        if count >= rank:
            if math.isinf(bound):  # beyond the last finite bucket: say its bound
                return round(lower_bound * 1000, 1)
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1.0
            return round((lower_bound + (bound - lower_bound) * share) * 1000, 1)
        lower_bound, lower_count = bound, count
    return round(lower_bound * 1000, 1)
