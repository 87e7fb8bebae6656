"""Metric names: those a running gateway exports on /metrics, and those PromQL text uses.
Shared by the alert rule and dashboard tests, so neither can name a metric that does not exist."""

from __future__ import annotations

import re
import urllib.request

from tests.conftest import Gateway

# Series Prometheus makes itself, not the gateway.
PROMETHEUS_SERIES = frozenset({"up"})
METRIC_NAME = re.compile(r"\b((?:nbiot_gateway|process)_[a-z0-9_]+)\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def scrape(gw: Gateway) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=5) as r:
        text: str = r.read().decode()
    return text


def exported_metric_names(metrics_text: str) -> set[str]:
    """Every series name the exposition declares (`# TYPE`, even with no sample yet) or has."""
    names: set[str] = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def referenced_metric_names(promql: str) -> set[str]:
    return set(METRIC_NAME.findall(promql))


def label_values(metrics_text: str, metric: str, label: str) -> set[str]:
    pattern = re.compile(rf'^{re.escape(metric)}\{{[^}}]*\b{re.escape(label)}="([^"]*)"', re.M)
    return set(pattern.findall(metrics_text))
