"""The Prometheus alert rules: valid for promtool, each one fired by its promtool unit test,
and naming only metrics a real running gateway exports."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT, Gateway
from tests.scrape import (
    PROMETHEUS_SERIES,
    exported_metric_names,
    label_values,
    referenced_metric_names,
    scrape,
)

RULES = ROOT / "config" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "tests" / "promtool" / "alerts_test.yml"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: run ./scripts/test, which installs Debian's `prometheus`")
    return found


def alert_names() -> list[str]:
    return re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.M)


def test_rules_pass_promtool_check() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_rules_pass_their_promtool_unit_tests() -> None:
    result = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)],
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    fired = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", RULE_TESTS.read_text()))

    assert len(alert_names()) == len(set(alert_names())), "duplicate alert names"
    assert fired == set(alert_names())


def test_every_alert_has_a_severity_summary_and_description() -> None:
    rules = re.split(r"^\s+- alert: ", RULES.read_text(), flags=re.M)[1:]

    assert len(rules) == len(alert_names())
    for rule in rules:
        name = rule.split("\n", 1)[0]
        assert re.search(r"severity: (critical|warning)\n", rule), name
        assert "summary: " in rule and "description: " in rule, name


def test_rules_name_only_metrics_the_gateway_exports(gateway: Gateway) -> None:
    text = scrape(gateway)

    exported = exported_metric_names(text) | PROMETHEUS_SERIES
    assert referenced_metric_names(RULES.read_text()) - exported == set()
    # The device-state selector must match what the gateway labels its gauge with.
    assert set(re.findall(r'nbiot_gateway_devices\{state="(\w+)"\}', RULES.read_text())) <= \
        label_values(text, "nbiot_gateway_devices", "state")
