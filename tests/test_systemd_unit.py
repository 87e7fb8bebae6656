"""The systemd unit: systemd's own checks (security score, verify), the installed config it
points at, and the sandbox it declares, approximated here without systemd as PID 1: the
gateway runs under the kernel's MemoryDenyWriteExecute (prctl PR_SET_MDWE) and under strace,
and every system call and socket family it used must pass the unit's filters."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import aiocoap
import pytest

from gateway.config import load_config
from tests.conftest import DEVICES, ROOT, Broker, SandboxedGateway, Subscription, wait_for

UNIT = ROOT / "systemd" / "nbiot-gateway.service"
SYSTEMD_CONFIG = ROOT / "config" / "gateway.systemd.toml"
INSTALLED_BINARY = "/opt/nbiot-gateway/bin/nbiot-gateway"
MAX_EXPOSURE = 2.0


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing: run ./scripts/test, which installs `systemd`")
    return found


def service_settings() -> list[tuple[str, str]]:
    """(key, value) of every line in [Service], in order (keys may repeat)."""
    settings, section = [], ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.append((key, value))
    return settings


def setting(key: str) -> list[str]:
    return [v for k, v in service_settings() if k == key]


# -- systemd's own checks ---------------------------------------------------------------------
def test_unit_scores_2_or_lower_on_systemd_analyze_security() -> None:
    result = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager", str(UNIT)],
                            capture_output=True, text=True, timeout=60)

    match = re.search(r"Overall exposure level for nbiot-gateway\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def verify(tmp_path: Path, drop_in: str | None = None) -> tuple[int, str]:
    """systemd-analyze verify of the unit (with a drop-in beside it, as systemctl edit makes)."""
    # verify insists that ExecStart's binary exists; the installed one lives in /opt, so check
    # a copy that differs in that path only, pointing at this checkout's console script.
    installed_here = Path(sys.executable).parent / "nbiot-gateway"
    assert installed_here.exists(), f"{installed_here}: install the project (pip install -e .)"
    text = UNIT.read_text()
    assert INSTALLED_BINARY in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED_BINARY, str(installed_here)))
    if drop_in is not None:
        (tmp_path / f"{UNIT.name}.d").mkdir()
        (tmp_path / f"{UNIT.name}.d" / "override.conf").write_text(drop_in)

    result = subprocess.run([systemd_analyze(), "verify", str(copy)],
                            capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout + result.stderr


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify exits 0 on unknown keys and unparsable values: it only warns. Any output fails.
    assert verify(tmp_path) == (0, "")


def test_static_user_drop_in_of_the_docs_passes_verify_and_keeps_the_directory_mode(
        tmp_path: Path) -> None:
    docs = (ROOT / "docs" / "operations.md").read_text()
    match = re.search(r"<!-- static-user drop-in -->\n```ini\n(.*?)```", docs, re.S)
    assert match, "docs/operations.md: the static-user drop-in is gone"
    drop_in = match.group(1)
    settings = dict(line.split("=", 1) for line in drop_in.splitlines() if "=" in line
                    and not line.startswith("#"))
    chmod = re.search(r"`root:nbiot-gateway`, mode (0\d{3})/0\d{3}", docs)

    assert verify(tmp_path, drop_in) == (0, "")
    assert settings["User"] == "nbiot-gateway" and settings["DynamicUser"] == "no"
    # The mode the docs have operators give /etc/nbiot-gateway: any other makes systemd log
    # "ConfigurationDirectory 'nbiot-gateway' already exists but the mode is different" at
    # every start (seen under systemd 252; scripts/systemd-tier checks it there).
    assert chmod and settings["ConfigurationDirectoryMode"] == chmod.group(1) == "0750"


def test_unit_runs_the_documented_command_with_watchdog_and_drain_time() -> None:
    grace_s = load_config(SYSTEMD_CONFIG).gateway.shutdown_grace_s
    commit_wait_s = 5.0  # gateway.runtime.service.COMMIT_WAIT_S

    assert setting("Type") == ["notify"]
    assert setting("ExecStart") == [f"{INSTALLED_BINARY} run --config /etc/nbiot-gateway/gateway.toml"]
    assert setting("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert _seconds(setting("WatchdogSec")[0]) > 0
    assert _seconds(setting("TimeoutStopSec")[0]) > commit_wait_s + grace_s
    assert setting("RestartPreventExitStatus") == ["2"]  # cli.EXIT_CONFIG
    assert "AF_INET6" in setting("RestrictAddressFamilies")[0].split()
    assert setting("StateDirectory") == ["nbiot-gateway"]
    assert setting("ConfigurationDirectory") == ["nbiot-gateway"]
    assert "ProcSubset" not in dict(service_settings())  # it hides /proc/stat: no process_*


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


# -- the config the unit points at ------------------------------------------------------------
def test_systemd_config_writes_only_below_the_state_directory() -> None:
    installed = load_config(SYSTEMD_CONFIG)
    default = load_config(ROOT / "config" / "gateway.toml")

    assert installed.spool.path == Path("/var/lib/nbiot-gateway/spool.sqlite")
    assert installed.liveness.path == Path("/var/lib/nbiot-gateway/liveness.sqlite")
    assert installed.registry.path == SYSTEMD_CONFIG.parent / "devices.csv"  # /etc/... installed
    # Everything else is the default config: the two files must not drift apart.
    ignore = {"spool": {"path"}, "registry": {"path"}, "liveness": {"path"}}
    assert (installed.model_dump(exclude=ignore) == default.model_dump(exclude=ignore))


def test_systemd_config_passes_check_config_where_it_is_installed(tmp_path: Path) -> None:
    etc = tmp_path / "etc" / "nbiot-gateway"
    etc.mkdir(parents=True)
    shutil.copy(SYSTEMD_CONFIG, etc / "gateway.toml")
    shutil.copy(ROOT / "config" / "devices.example.csv", etc / "devices.csv")

    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(etc / "gateway.toml")],
        capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert "spool /var/lib/nbiot-gateway/spool.sqlite" in result.stdout


# -- the sandbox, approximated ----------------------------------------------------------------
# Turn on the kernel's W^X rule for this process and its exec'd children, then exec argv[1:].
# MemoryDenyWriteExecute= does the same with seccomp; PR_SET_MDWE needs Linux >= 6.3.
MDWE_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(f"PR_SET_MDWE failed (errno {ctypes.get_errno()}): Linux >= 6.3 needed")
os.execv(sys.argv[1], sys.argv[1:])
"""
SYSCALL_LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. )?([a-z_0-9]+)(?:\(| resumed>)")
SOCKET_FAMILY = re.compile(r"\bsocket(?:pair)?\((AF_[A-Z0-9]+)")
FAMILY_NAMES = {"AF_INET", "AF_INET6", "AF_UNIX", "AF_LOCAL"}


@pytest.fixture(params=[1, 2], ids=["one process", "two workers"])
def sandboxed_gateway(broker: Broker, tmp_path: Path, request: pytest.FixtureRequest
                      ) -> Iterator[SandboxedGateway]:
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is missing: run ./scripts/test, which installs it")
    workdir = tmp_path / "gw"
    workdir.mkdir()
    # As under systemd: a notify socket with the watchdog on, and CoAP bound as installed,
    # "::" (IPv4 devices arrive v4-mapped on an AF_INET6 socket).
    notify_name = f"nbiot-gateway-sandbox-{os.getpid()}"
    notify_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_socket.bind("\0" + notify_name)
    gw = SandboxedGateway(workdir, broker.port, env_extra={
        "NBIOT_COAP__BIND": "::", "NOTIFY_SOCKET": "@" + notify_name, "WATCHDOG_USEC": "1000000",
        "NBIOT_GATEWAY__WORKERS": str(request.param)})
    gw.prefix = [strace, "-f", "-qq", "-o", str(workdir / "strace.txt"),
                 sys.executable, "-c", MDWE_EXEC]
    gw.write_config()
    gw.start()
    yield gw
    if gw.proc is not None:
        gw.kill()
    notify_socket.close()


@cache
def syscall_groups() -> dict[str, list[str]]:
    """systemd's own table of @groups, as this systemd version defines them."""
    out = subprocess.run([systemd_analyze(), "syscall-filter", "--no-pager"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#") and line.startswith(" "):
            current.append(line.strip())
    return groups


def expand(names: list[str]) -> set[str]:
    calls: set[str] = set()
    for name in names:
        calls |= expand(syscall_groups()[name]) if name.startswith("@") else {name}
    return calls


def unit_syscall_allow_list() -> set[str]:
    allowed: set[str] = set()
    denied: set[str] = set()
    for value in setting("SystemCallFilter"):
        if value.startswith("~"):
            denied |= expand(value[1:].split())
        else:
            allowed |= expand(value.split())
    return allowed - denied


def root_only_calls() -> set[str]:
    """Calls made only because this test runs as root; the service never is (DynamicUser=).
    SQLite, when geteuid() == 0, fchown()s a new journal/WAL to the database's owner."""
    return {"fchown"} if os.geteuid() == 0 else set()


def gateway_trace(trace: Path) -> list[str]:
    """strace lines from the gateway itself: everything after the wrapper's exec of Python."""
    lines = trace.read_text().splitlines()
    execs = [i for i, line in enumerate(lines) if re.match(r"^\d+\s+execve\(", line)]
    assert len(execs) >= 2, "expected strace to see the wrapper exec the gateway"
    return lines[execs[1]:]


async def test_gateway_works_inside_the_units_syscall_filter_and_memory_rules(
    sandboxed_gateway: SandboxedGateway, subscribe: Callable[[str], Subscription]
) -> None:
    gw = sandboxed_gateway
    sub = subscribe("nbiot/#")
    ctx = await aiocoap.Context.create_client_context()
    try:
        for seq in (1, 2, 3):
            request = aiocoap.Message(code=aiocoap.POST, uri=gw.uri(DEVICES[0]),
                                      payload=json.dumps({"seq": seq, "temperature": 20.0}).encode(),
                                      content_format=50)
            response = await ctx.request(request).response
            assert response.code == aiocoap.CHANGED
    finally:
        await ctx.shutdown()
    sub.wait_count(3)
    gw.signal_gateway(signal.SIGHUP)
    wait_for(lambda: "reloaded registry" in gw.log_path.read_text(), what="reload logged")

    returncode = gw.stop(signal.SIGTERM)

    lines = gateway_trace(gw.workdir / "strace.txt")
    used = {m.group(2) for line in lines if (m := SYSCALL_LINE.match(line))}
    families = {m.group(1) for line in lines if (m := SOCKET_FAMILY.search(line))}
    unit_families = set(setting("RestrictAddressFamilies")[0].split()) | {"AF_LOCAL"}
    assert returncode == 0, gw.log_path.read_text()
    assert {"recvfrom", "sendto", "fdatasync"} <= used  # the trace is real
    assert used & {"epoll_wait", "epoll_pwait", "epoll_pwait2"}  # asyncio's or libuv's poll
    assert used - unit_syscall_allow_list() - root_only_calls() == set()
    assert {"AF_INET6", "AF_UNIX"} <= families
    assert families <= FAMILY_NAMES & unit_families
