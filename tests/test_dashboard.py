"""The Grafana dashboard: valid JSON, every query valid PromQL (promtool), and every metric it
draws exported by a real running gateway."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, Gateway
from tests.scrape import PROMETHEUS_SERIES, exported_metric_names, referenced_metric_names, scrape
from tests.test_alerts import promtool

DASHBOARD = ROOT / "config" / "grafana" / "nbiot-gateway.json"
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".*", "$instance": ".*"}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target and annotation."""
    found = []
    for panel in dashboard()["panels"]:
        found += [(panel["title"], target["expr"]) for target in panel.get("targets", [])]
    found += [(a["name"], a["expr"]) for a in dashboard()["annotations"]["list"] if "expr" in a]
    return found


def test_dashboard_is_a_grafana_dashboard_with_panels_for_each_area() -> None:
    board = dashboard()

    assert board["uid"] == "nbiot-gateway"
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Overview", "Uplinks", "Spool", "Broker", "Devices", "Process"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert all(t["datasource"]["uid"] == "${datasource}" for p in board["panels"]
               for t in p.get("targets", []))


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool has no query checker; a recording rule per query gets the same parser.
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(expr)}"]
    rule_file = tmp_path / "dashboard_rules.yml"
    rule_file.write_text("\n".join(rules) + "\n")

    result = subprocess.run([promtool(), "check", "rules", str(rule_file)],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries())} rules found" in result.stdout


def test_dashboard_draws_only_metrics_the_gateway_exports(gateway: Gateway) -> None:
    exported = exported_metric_names(scrape(gateway)) | PROMETHEUS_SERIES

    drawn = set().union(*(referenced_metric_names(expr) for _, expr in queries()))
    assert drawn - exported == set()
    # The panels the operator asked for are all there.
    assert {"nbiot_gateway_uplinks_accepted_total", "nbiot_gateway_uplinks_rejected_total",
            "nbiot_gateway_uplink_ack_seconds_bucket", "nbiot_gateway_spool_records",
            "nbiot_gateway_spool_bytes", "nbiot_gateway_spool_max_bytes",
            "nbiot_gateway_mqtt_connected", "nbiot_gateway_mqtt_published_total",
            "nbiot_gateway_devices", "nbiot_gateway_event_loop_lag_seconds",
            "process_cpu_seconds_total", "process_resident_memory_bytes"} <= drawn
