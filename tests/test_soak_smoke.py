"""The soak's smoke run: a short soak samples the gateway at its interval, reports a trend
for each figure, and loses nothing it acked. Slopes of a 15 s run mean nothing: only
the output's structure and delivery are checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FIGURES = ["RSS", "open files", "spool depth", "CPU", "disk writes"]


def test_soak_samples_the_gateway_and_reports_a_trend_per_figure(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"

    done = subprocess.run(
        [sys.executable, "-m", "gateway", "soak", "--devices", "200", "--interval", "1",
         "--duration", "9", "--sample-every", "1.5", "--json", str(out)],
        capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    samples = result["samples"]
    assert len(samples) == 6, samples  # at 1.5, 3, ... 9 s
    assert [line.startswith("t=") for line in done.stdout.splitlines()].count(True) == 6
    assert all(s["rss_mb"] > 0 and s["open_files"] > 0 for s in samples), samples
    assert sum(s["uplinks_per_s"] for s in samples) > 0, samples
    assert result["warmup_s"] == 3  # 600 s by default, at most a third of the run
    trends = result["trends"]
    assert [t["figure"] for t in trends] == FIGURES
    assert all(t["verdict"] in {"flat", "growing", "shrinking"} for t in trends), trends
    assert all(t["samples"] == 5 for t in trends), trends  # those at 3 s and later
    assert result["load"]["sent"] == 1800 and result["load"]["acked"] > 0
    assert result["delivery"]["lost"] == 0
    assert result["delivery"]["delivered"] == result["load"]["acked"]
    for figure in FIGURES:
        assert figure in done.stdout.split("trends after", 1)[1]
