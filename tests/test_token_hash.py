"""A registry may hold the SHA-256 of each token instead of the token itself."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiocoap

from tests.coap_raw import RawCoap, uplink_request
from tests.conftest import Gateway


def hashed_registry(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("device_id,type,token_sha256,report_interval_s\n" + "".join(
        f"{device_id},env_th,{digest},60\n" for device_id, digest in rows))
    return path


def test_device_with_a_hashed_token_is_accepted_with_the_token_and_refused_without(
    gateway_factory: Callable[..., Gateway], tmp_path: Path,
) -> None:
    digest = hashlib.sha256(b"s3cret-token").hexdigest()
    registry = hashed_registry(tmp_path / "hashed.csv", [("h-1", digest)])
    gateway = gateway_factory(NBIOT_REGISTRY__PATH=str(registry))

    with RawCoap(gateway.coap_port) as device:
        right = device.exchange(uplink_request(gateway.uri("h-1", "s3cret-token"),
                                               {"seq": 1, "temperature": 20.0}))
        wrong = device.exchange(uplink_request(gateway.uri("h-1", digest),
                                               {"seq": 2, "temperature": 20.0}))

    assert right.code == aiocoap.CHANGED
    assert wrong.code == aiocoap.UNAUTHORIZED  # the digest itself is no token
    assert digest not in gateway.log_path.read_text()


def test_malformed_token_hash_is_a_registry_error_that_hides_it(tmp_path: Path) -> None:
    registry = hashed_registry(tmp_path / "bad.csv", [("h-1", "abc123")])
    config = tmp_path / "gateway.toml"
    config.write_text((Path(__file__).parent.parent / "config" / "gateway.toml").read_text()
                      .replace('path = "devices.example.csv"', f'path = "{registry}"'))

    done = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config",
                           str(config)], capture_output=True, text=True, timeout=30)

    assert done.returncode == 2
    assert "bad.csv:2: token_sha256 is not 64 hex digits" in done.stderr
    assert "abc123" not in done.stderr
