"""`nbiot-gateway demo` as a user runs it: its own broker and gateway, a short fleet run, a
summary, a clean stop."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

SUMMARY_KEYS = {"devices", "sent", "acked", "rejected_by_code", "retransmissions", "delivered",
                "duplicates_delivered", "lost", "ack_latency_ms", "delivery_latency_ms",
                "gateway_ack_latency_ms", "gateway_cpu_per_uplink_us", "sim_cpu_per_report_us",
                "fleet_lag_ms", "witness_lag_ms", "latencies_distorted"}


def figure(label: str, text: str) -> int:
    found = re.search(rf"^{re.escape(label)}\s+(\d+)", text, re.MULTILINE)
    assert found, f"no {label!r} row in:\n{text}"
    return int(found.group(1))


def test_short_demo_exits_0_and_prints_the_summary(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"

    result = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--devices", "200", "--duration", "5",
         "--json", str(summary_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=180)

    assert result.returncode == 0, result.stdout + result.stderr
    assert figure("LOST", result.stdout) == 0
    acked = figure("acked (2.04)", result.stdout)
    assert acked > 0
    assert figure("delivered (MQTT)", result.stdout) >= acked
    assert "gateway (from its /metrics):" in result.stdout
    assert re.search(r"^gateway ack ms\s+p50 [\d.]+", result.stdout, re.MULTILINE)
    assert re.search(r"^simulator\s+.* µs per report", result.stdout, re.MULTILINE)
    assert re.search(r"^gateway\s+.* µs per uplink; simulator/gateway [\d.]+$", result.stdout,
                     re.MULTILINE)
    assert "broker and gateway stopped cleanly" in result.stderr
    summary = json.loads(summary_path.read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["devices"] == 200 and summary["lost"] == 0
    assert set(summary["ack_latency_ms"]) >= {"p50", "p95", "p99"}
