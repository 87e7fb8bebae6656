"""The benchmark's smoke run: every target starts, serves the load and is reported side
by side, and nothing acknowledged is lost. No thresholds: the figures live in
docs/benchmarks.md, measured by `nbiot-gateway bench` on a quiet machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_measures_every_target_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"

    done = subprocess.run(
        [sys.executable, "-m", "gateway", "bench", "--devices", "50", "--duration", "1",
         "--json", str(out)], capture_output=True, text=True, timeout=240)

    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    targets = [r["target"] for r in result["results"]]
    assert targets == ["gateway", "aiocoap (bare)", "libcoap (C)", "gateway, broker down",
                       "gateway at half rate", "gateway, 2 workers"]
    assert all(r["answered"] > 0 for r in result["results"]), result
    assert [r["lost"] for r in result["results"] if r["lost"] is not None] == [0, 0, 0]
    assert set(result["ratios"]) == {"gateway/aiocoap", "gateway/libcoap",
                                     "broker_down/end_to_end", "workers_2/workers_1",
                                     "gateway_2_workers/libcoap"}
    assert "ratios: gateway/aiocoap" in done.stdout


def test_fleet_profile_measures_each_rate_then_saturation_and_loses_nothing(
        tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"

    done = subprocess.run(
        [sys.executable, "-m", "gateway", "bench", "--profile", "fleet", "--devices", "400",
         "--rates", "200", "--duration", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=240)

    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["results"]] == ["200/s", "saturated"]
    assert result["warmup"]["load"]["acked"] == 400
    for r in [result["warmup"], *result["results"]]:
        assert r["load"]["acked"] > 0, r
        assert r["delivery"]["lost"] == 0, r
        assert r["delivery"]["delivered"] == r["load"]["acked"], r
        assert r["gateway"]["accepted"] >= r["load"]["acked"], r
        assert r["gateway"]["cpu_ms_per_uplink"] > 0, r
        assert r["gateway"]["fsyncs_per_s"] > 0, r
        assert r["gateway"]["records_per_commit"] >= 1, r
        assert r["gateway"]["ack_p50_ms"] is not None, r
        assert r["delivery"]["mqtt_message_bytes"] > 0, r
        assert r["gateway"]["disk_bytes_per_uplink"] >= 0, r
    paced = result["results"][0]["load"]
    assert paced["sent"] == 600 and paced["offered_per_s"] == 200
    assert set(result["ratios"]) == {"cpu 200/s / saturated", "disk 200/s / saturated"}
    assert "disk bytes per uplink / MQTT message size" in done.stdout
