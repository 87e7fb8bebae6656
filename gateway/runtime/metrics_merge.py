"""Merge the `/metrics` expositions of the worker processes into the one the supervisor serves.

With `gateway.workers = N` every worker has its own `Metrics` registry. Prometheus scrapes one
endpoint, and the alert rules and dashboards use plain metric names (no worker label), so the
supervisor combines the workers' samples of the same name and label set into one: summed by
default, or by the rule in `COMBINE` where a sum would lie. HELP and TYPE come from the workers;
the output is written by prometheus_client's own `generate_latest`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

from prometheus_client import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.runtime.metrics import NS, WORKERS_HELP, WORKERS_UP_HELP

Combine = Callable[[float, float], float]


def _min(a: float, b: float) -> float:
    return a if a <= b else b


def _max(a: float, b: float) -> float:
    return a if a >= b else b


# Samples (by exact sample name) NOT summed across workers. Every other sample is summed:
# counters, histogram _bucket/_sum/_count, spool records/bytes/max_bytes, devices{state},
# registry devices, DTLS sessions, process CPU seconds and memory.
COMBINE: Final[Mapping[str, Combine]] = {
    # 1 only if every worker holds its broker connection: one worker without it is enough
    # for NbiotGatewayBrokerDisconnected (its devices' records pile up in its spool).
    "nbiot_gateway_mqtt_connected": _min,
    # The worst worker's lag is what its devices wait; a sum is no duration at all.
    "nbiot_gateway_event_loop_lag_seconds": _max,
    # A cluster host: each worker hears the peers on its own; the host hears a peer only
    # if every worker does (one deaf worker is enough to take devices it should not).
    "nbiot_gateway_cluster_peer_up": _min,
    "nbiot_gateway_cluster_hosts_alive": _min,
    # Always 1 per version label; a sum would read as N.
    "nbiot_gateway_build_info": _max,
    # When the service started (a worker's death restarts them all: gateway/runtime/supervisor.py);
    # `changes()` in the restart alert and annotation see each restart once.
    "process_start_time_seconds": _min,
    # The fd limit is per process: the tightest one is the one that bites.
    "process_max_fds": _min,
    # Shown against process_max_fds (a per-process limit): the worker nearest its limit.
    "process_open_fds": _max,
}

WORKERS: Final = f"{NS}_workers"
WORKERS_UP: Final = f"{NS}_workers_up"

# `*_created` series (gateway.runtime.metrics disables them) are dropped: a creation time per
# worker has no merged value. The text format puts each in a family of its own.
_CREATED: Final = "_created"

_LabelKey = tuple[tuple[str, str], ...]


class _Merged(Collector):
    """The merged families, for `generate_latest` (which accepts any collector)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge(expositions: Sequence[bytes], workers_expected: int, up: int | None = None) -> bytes:
    """One Prometheus text exposition (`CONTENT_TYPE_LATEST`) from the workers' expositions
    (each the bytes of `generate_latest(worker_registry)`), plus `nbiot_gateway_workers`
    (= `workers_expected`) and `nbiot_gateway_workers_up` (= `up`, by default
    `len(expositions)`).

    A worker that did not answer this scrape is best given by its last exposition, with
    `up` counting only the fresh ones: left out, it would make every summed counter dip,
    which Prometheus reads as a counter reset. A label set some workers lack is merged from
    those that have it. Raises ValueError naming the index of an exposition that does not parse.
    """
    # family name -> (first worker's family: name, HELP, TYPE; merged samples by key)
    families: dict[str, tuple[Metric, dict[tuple[str, _LabelKey], float]]] = {}
    for index, text in enumerate(expositions):
        try:
            parsed = list(text_string_to_metric_families(text.decode("utf-8")))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"worker exposition {index} is not valid: {exc}") from exc
        for family in parsed:
            if family.name in (WORKERS, WORKERS_UP) or family.name.endswith(_CREATED):
                continue  # ours come below, never two copies; creation times: see _CREATED
            entry = families.get(family.name)
            if entry is None:
                entry = families[family.name] = (family, {})
            values = entry[1]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in values:
                    combine = COMBINE.get(sample.name)
                    old = values[key]
                    values[key] = combine(old, sample.value) if combine else old + sample.value
                else:
                    values[key] = sample.value

    out: list[Metric] = [
        GaugeMetricFamily(WORKERS, WORKERS_HELP, value=workers_expected),
        GaugeMetricFamily(WORKERS_UP, WORKERS_UP_HELP,
                          value=len(expositions) if up is None else up),
    ]
    for first, values in families.values():
        merged = Metric(first.name, first.documentation, first.type, first.unit)
        for (name, labels), value in values.items():
            merged.add_sample(name, dict(labels), value)
        out.append(merged)
    return generate_latest(_Merged(out))
