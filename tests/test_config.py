"""Configuration and registry validation as an operator meets it: `check-config` and `run`
exit 2 with one line per problem naming the key (or the registry line); 0 when all is well."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiocoap
import pytest

from tests.conftest import DEFAULT_CONFIG, Gateway, free_port

SHIPPED_REGISTRY = DEFAULT_CONFIG.parent / "devices.example.csv"
HEADER = "device_id,type,token,report_interval_s\n"


def gateway_cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m gateway ARGS` with only the NBIOT_* variables given here."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("NBIOT_")}
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, env={**clean, **env}, cwd=cwd, timeout=60, check=False)


def check_config(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return gateway_cli("check-config", "--config", str(config), cwd=config.parent, **env)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A copy of the shipped config and registry in a scratch directory."""
    shutil.copy(SHIPPED_REGISTRY, tmp_path / SHIPPED_REGISTRY.name)
    path = tmp_path / "gateway.toml"
    shutil.copy(DEFAULT_CONFIG, path)
    return path


def edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))
    return path


def with_registry(config: Path, rows: str, raw: bytes | None = None) -> Path:
    registry = config.parent / "devices.csv"
    registry.write_bytes(raw if raw is not None else (HEADER + rows).encode())
    return edit(config, 'path = "devices.example.csv"', 'path = "devices.csv"')


# -- the shipped config ---------------------------------------------------------------------
def test_check_config_accepts_the_shipped_config() -> None:
    result = check_config(DEFAULT_CONFIG)

    assert result.returncode == 0, result.stderr
    shipped_rows = len(SHIPPED_REGISTRY.read_text().splitlines()) - 1
    assert f"OK: {shipped_rows} devices, 4 device types" in result.stdout


# -- bad values and keys ----------------------------------------------------------------------
@pytest.mark.parametrize(("old", "new", "problem"), [
    ("port = 1883", "port = 70000", "mqtt.port: Input should be less than 65536"),
    ("port = 5683", 'port = "coap"', "coap.port: Input should be a valid integer"),
    ('topic_prefix = "nbiot"', 'topic_prefix = "a/b"', "mqtt.topic_prefix: String should match"),
    ("reconnect_max_s = 30.0", "reconnect_max_s = 0.1",
     "mqtt: Value error, reconnect_max_s must be >= reconnect_min_s"),
    ("min = -40.0\nmax = 85.0", "min = 85.0\nmax = -40.0",
     "types.env_th.fields.temperature: Value error, min (85.0) is greater than max (-40.0)"),
    ('temperature = "/3303/0/5700"', 'temperature = "/3303/0"',
     "types.env_th.lwm2m: Value error, fields.temperature: '/3303/0' is not a resource path"),
    ('temperature = "/3303/0/5700"', 'temperature = "/3304/0/5700"',
     "types.env_th.lwm2m: Value error, fields: two fields map the same resource"),
    ('temperature = "/3303/0/5700"', 'dewpoint = "/3303/0/5700"',
     "types.env_th: Value error, lwm2m.fields.dewpoint: no such field in this type's fields"),
    ('observe = ["/3303/0/5700"', 'observe = ["/3303/0/5700/1"',
     "types.env_th.lwm2m: Value error, observe: '/3303/0/5700/1' is not an object"),
    ("max_lifetime_s = 2592000", "max_lifetime_s = 10",
     "lwm2m: Value error, min_lifetime_s is greater than max_lifetime_s"),
])
def test_check_config_names_the_key_of_a_bad_value(
    config: Path, old: str, new: str, problem: str
) -> None:
    result = check_config(edit(config, old, new))

    assert result.returncode == 2
    assert problem in result.stderr


def test_lwm2m_with_workers_is_refused_until_it_is_supported(config: Path) -> None:
    result = check_config(config, NBIOT_LWM2M__ENABLED="true", NBIOT_GATEWAY__WORKERS="2")

    assert result.returncode == 2
    assert "lwm2m.enabled with gateway.workers > 1 or cluster.enabled: not supported yet" in result.stderr


@pytest.mark.parametrize(("old", "new", "problem"), [
    ("keepalive_s = 30", "keepalive_ss = 30", "mqtt.keepalive_ss: Extra inputs are not permitted"),
    ("[spool]", "[spoool]", "spoool: Extra inputs are not permitted"),
])
def test_check_config_rejects_a_misspelt_key(config: Path, old: str, new: str, problem: str) -> None:
    result = check_config(edit(config, old, new))

    assert result.returncode == 2
    assert problem in result.stderr


def test_check_config_lists_every_problem_not_just_the_first(config: Path) -> None:
    edit(config, "port = 1883", "port = 0")
    result = check_config(edit(config, "keepalive_s = 30", "keepalive_s = 1"))

    assert result.returncode == 2
    assert "mqtt.port: Input should be greater than or equal to 1" in result.stderr
    assert "mqtt.keepalive_s: Input should be greater than or equal to 5" in result.stderr


# -- the file itself --------------------------------------------------------------------------
def test_check_config_rejects_a_file_that_is_not_toml(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[mqtt]\nport = 1883\nthis is not toml\n")

    result = check_config(config)

    assert result.returncode == 2
    assert f"{config}: not valid TOML" in result.stderr
    assert "line 3" in result.stderr


def test_check_config_rejects_a_config_that_is_not_utf8(config: Path) -> None:
    config.write_bytes(b"# Z\xfcrich plant\n" + config.read_bytes())

    result = check_config(config)

    assert result.returncode == 2
    assert "not UTF-8" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_reports_a_missing_config_file(tmp_path: Path) -> None:
    result = check_config(tmp_path / "nope.toml")

    assert result.returncode == 2
    assert f"config file {tmp_path / 'nope.toml'} does not exist" in result.stderr


def test_check_config_reports_a_missing_registry_file(config: Path) -> None:
    result = check_config(edit(config, 'path = "devices.example.csv"', 'path = "gone.csv"'))

    assert result.returncode == 2
    assert f"registry.path: cannot read {config.parent / 'gone.csv'}" in result.stderr


# -- the registry -----------------------------------------------------------------------------
@pytest.mark.parametrize(("rows", "problem"), [
    ("d1,env_th,t1,60\nd2,thermostat,t2,60\n", "devices.csv:3: type 'thermostat' is not defined"),
    ("d1,env_th,t1,60\nd2,env_th,t2,60\nd1,gas,t3,60\n",
     "devices.csv:4: device_id 'd1' appears twice (first on line 2)"),
    ("d1,env_th,t1,sixty\n", "devices.csv:2: report_interval_s 'sixty' is not a positive integer"),
    ("d1,env_th,t1,0\n", "devices.csv:2: report_interval_s '0' is not a positive integer"),
    ("d1,env_th,,60\n", "devices.csv:2: token is empty"),
    ("d1,env_th,t1\n", "devices.csv:2: expected 4 columns, got 3"),
    # an id of its own: pytest 8 puts a parameter's text into PYTEST_CURRENT_TEST, and
    # 20,000 rows of it make the gateway's environment too long to exec
    pytest.param('d1,env_th,t1,60\n"d2,env_th,t2,60\n' + "d3,env_th,t3,60\n" * 20_000,
                 "not valid CSV", id="unclosed-quote-then-20000-rows"),
])
def test_check_config_names_the_registry_line_of_a_bad_row(
    config: Path, rows: str, problem: str
) -> None:
    result = check_config(with_registry(config, rows))

    assert result.returncode == 2
    assert problem in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_explains_a_registry_with_the_wrong_separator(config: Path) -> None:
    result = check_config(with_registry(config, "", raw=b"device_id;type;token;report_interval_s\n"))

    assert result.returncode == 2
    assert "devices.csv:1: missing column(s) device_id" in result.stderr
    assert "comma-separated" in result.stderr


def test_check_config_accepts_a_registry_saved_with_a_byte_order_mark(config: Path) -> None:
    bom = b"\xef\xbb\xbf"

    result = check_config(with_registry(config, "", raw=bom + (HEADER + "d1,gas,t1,60\n").encode()))

    assert result.returncode == 0, result.stderr
    assert "OK: 1 devices" in result.stdout


def test_check_config_names_the_line_of_a_registry_that_is_not_utf8(config: Path) -> None:
    result = check_config(with_registry(config, "", raw=(HEADER + "d1,gas,t1,60\n").encode()
                                        + b"k\xf6ln-1,gas,t2,60\n"))

    assert result.returncode == 2
    assert "devices.csv:3: not UTF-8 text" in result.stderr


def test_check_config_loads_a_registry_of_40000_devices(config: Path) -> None:
    rows = "".join(f"dev-{i:05d},env_th,tok-{i:05d},60\n" for i in range(40_000))

    result = check_config(with_registry(config, rows))

    assert result.returncode == 0, result.stderr
    assert "OK: 40000 devices" in result.stdout


# -- the environment --------------------------------------------------------------------------
def test_environment_overrides_the_file(config: Path) -> None:
    edit(config, 'host = "localhost"', 'host = "broker.plant.example"')

    result = check_config(config, NBIOT_MQTT__PORT="1884")

    assert result.returncode == 0, result.stderr
    assert "broker broker.plant.example:1884" in result.stdout  # the rest of [mqtt] is kept


def test_an_invalid_environment_value_is_rejected_naming_the_variable(config: Path) -> None:
    result = check_config(config, NBIOT_MQTT__PORT="eighteen-eighty-three")

    assert result.returncode == 2
    assert "mqtt.port: Input should be a valid integer" in result.stderr
    assert "NBIOT_MQTT__PORT" in result.stderr


@pytest.mark.parametrize("variable", ["NBIOT_MQTT__PORTT", "NBIOT_MQQT__PORT", "nbiot_mqqt__port"])
def test_a_misspelt_environment_variable_is_rejected(config: Path, variable: str) -> None:
    result = check_config(config, **{variable: "1884"})

    assert result.returncode == 2
    assert variable in result.stderr


# -- run ----------------------------------------------------------------------------------------
def test_run_with_a_bad_config_exits_2(config: Path) -> None:
    result = gateway_cli("run", "--config", str(edit(config, "port = 1883", "port = 70000")),
                         cwd=config.parent)

    assert result.returncode == 2
    assert "mqtt.port: Input should be less than 65536" in result.stderr


def test_run_with_a_missing_registry_exits_2(config: Path) -> None:
    edit(config, 'path = "devices.example.csv"', 'path = "gone.csv"')

    result = gateway_cli("run", "--config", str(config), cwd=config.parent)

    assert result.returncode == 2
    assert f"{config}: configuration is invalid" in result.stderr
    assert "registry.path: cannot read" in result.stderr


def test_run_exits_1_naming_the_coap_port_when_it_is_taken(config: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        coap_port = taken.getsockname()[1]
        edit(config, 'bind = "::"', 'bind = "127.0.0.1"')
        edit(config, "port = 5683", f"port = {coap_port}")
        edit(config, "port = 9108", f"port = {free_port()}")
        edit(config, 'path = "../var/spool.sqlite"', 'path = "spool.sqlite"')

        result = gateway_cli("run", "--config", str(config), cwd=config.parent)  # no hang

    assert result.returncode == 1
    assert f"coap: cannot bind udp 127.0.0.1 port {coap_port}" in result.stderr


# -- what the registry means at run time ------------------------------------------------------
async def test_registry_columns_padded_with_spaces_still_authenticate(
    gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    registry = tmp_path / "padded.csv"
    registry.write_text("device_id, type, token, report_interval_s\n"
                        "pad-1, env_th, tok-pad-1, 60\n")
    gw = gateway_factory(NBIOT_REGISTRY__PATH=str(registry))
    ctx = await aiocoap.Context.create_client_context()
    try:
        request = aiocoap.Message(code=aiocoap.POST, uri=gw.uri("pad-1", "tok-pad-1"),
                                  payload=json.dumps({"temperature": 20.0}).encode())
        response = await ctx.request(request).response
    finally:
        await ctx.shutdown()

    assert response.code == aiocoap.CHANGED, response.payload
