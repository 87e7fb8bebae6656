"""`nbiot-gateway sim` on the command line: registry generation and argument errors (the
runs themselves are in test_sim_e2e.py and test_demo.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import load_config
from gateway.pipeline.registry import load_registry
from tests.conftest import DEFAULT_CONFIG


def test_make_registry_writes_a_registry_the_gateway_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fleet.csv"

    code = main(["sim", "--config", str(DEFAULT_CONFIG), "--make-registry", "250", "--out", str(out)])

    assert code == 0
    registry = load_registry(out, load_config(DEFAULT_CONFIG).types)
    assert len(registry) == 250
    assert {d.device_type for d in registry} == {"env_th", "power_meter", "vibration", "gas"}
    assert "wrote 250 devices" in capsys.readouterr().out


def test_make_registry_never_overwrites_a_file(tmp_path: Path) -> None:
    out = tmp_path / "devices.csv"
    out.write_text("keep me\n")

    code = main(["sim", "--config", str(DEFAULT_CONFIG), "--make-registry", "10", "--out", str(out)])

    assert code == 2
    assert out.read_text() == "keep me\n"


def test_make_registry_without_out_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sim", "--config", str(DEFAULT_CONFIG), "--make-registry", "10"])

    assert code == 2
    assert "--out" in capsys.readouterr().err


def test_more_devices_than_the_registry_exits_2_and_says_how_to_make_more(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["sim", "--config", str(DEFAULT_CONFIG), "--devices", "1000000", "--no-progress"])

    assert code == 2
    assert "--make-registry 1000000" in capsys.readouterr().err


def test_bad_sim_option_names_its_key(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sim", "--config", str(DEFAULT_CONFIG), "--faulty-share", "1.5", "--no-progress"])

    assert code == 2
    assert "sim.faulty_share" in capsys.readouterr().err


def test_processes_below_one_exits_2_naming_its_key(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sim", "--config", str(DEFAULT_CONFIG), "--processes", "0", "--no-progress"])

    assert code == 2
    assert "sim.processes" in capsys.readouterr().err
