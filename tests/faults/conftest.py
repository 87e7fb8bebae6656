"""Fixtures of the fault suite: small disks (a tmpfs, an ext4 image on a loop device that
can be frozen), the real gateway started under a fault tool (libfiu's fiu-run, libfaketime),
and a witness on the broker. Whatever a test mounts or freezes is undone in teardown, also
when the test fails."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import (
    Broker,
    Gateway,
    Subscription,
    popen_logged,
    start_subscription,
    stop_subscriptions,
    wait_for,
)

FIU_POSIX = Path("/usr/lib/fiu/fiu_posix_preload.so")
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here is part of the fault suite (`-m faults`)."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.faults)


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=60)


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("a disk of its own needs root (mount, a loop device, fsfreeze)")


def require(path_or_tool: str) -> None:
    if not (shutil.which(path_or_tool) or Path(path_or_tool).exists()):
        pytest.fail(f"{path_or_tool} is missing: run ./scripts/test, which installs it")


# -- disks --------------------------------------------------------------------------------
class Disks:
    """Filesystems made for one test; `close()` thaws and unmounts every one of them."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._mounted: list[Path] = []
        self._frozen: set[Path] = set()

    def tmpfs(self, size_bytes: int) -> Path:
        """A tmpfs of `size_bytes`: a disk that fills up quickly."""
        require_root()
        path = self._mountpoint("tmpfs")
        run("mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "nbiot-faults", str(path))
        self._mounted.append(path)
        return path

    def ext4(self, size_bytes: int = 32 << 20) -> Path:
        """An ext4 filesystem in an image file on a loop device: unlike tmpfs it can be
        frozen (fsfreeze), which stalls every write and fsync until it is thawed."""
        require_root()
        require("fsfreeze")
        require("mkfs.ext4")
        image = self._root / f"ext4-{len(self._mounted)}.img"
        with image.open("wb") as f:
            f.truncate(size_bytes)
        run("mkfs.ext4", "-q", "-F", str(image))
        path = self._mountpoint("ext4")
        run("mount", "-o", "loop", str(image), str(path))  # the loop device goes with umount
        self._mounted.append(path)
        return path

    @contextlib.contextmanager
    def frozen(self, path: Path) -> Iterator[None]:
        """The disk stalls: writes and fsyncs wait (uninterruptibly) until the block ends."""
        run("fsfreeze", "--freeze", str(path))
        self._frozen.add(path)
        try:
            yield
        finally:
            self._thaw(path)

    def _thaw(self, path: Path) -> None:
        if path in self._frozen:
            run("fsfreeze", "--unfreeze", str(path))
            self._frozen.discard(path)

    def _mountpoint(self, kind: str) -> Path:
        path = self._root / f"{kind}-{len(self._mounted)}"
        path.mkdir()
        return path

    def close(self) -> None:
        for path in list(self._frozen):
            self._thaw(path)
        for path in reversed(self._mounted):
            if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
                # Still busy (a process we could not stop): detach it anyway, never leave it.
                subprocess.run(["umount", "--lazy", str(path)], capture_output=True, check=False)
        self._mounted.clear()


def fill(disk: Path) -> Path:
    """Write a file until the disk has no byte left; remove it to free the space."""
    filler = disk / "filler"
    chunk = b"\0" * (64 << 10)
    with filler.open("wb", buffering=0) as f:
        while chunk:
            try:
                f.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                chunk = chunk[:len(chunk) // 2]  # the last pages, down to one byte
    return filler


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[Disks]:
    made = Disks(tmp_path)
    try:
        yield made
    finally:
        made.close()


# -- the gateway under a fault tool -------------------------------------------------------
@dataclass
class FaultGateway(Gateway):
    """The real gateway (a subprocess), started behind `wrapper` (fiu-run) with
    `env_extra` (libfaketime's) in its environment, its spool wherever the test put it."""

    wrapper: list[str] = field(default_factory=list)

    def start(self) -> None:
        env = {**os.environ, **self.env_extra}
        self.proc = popen_logged(
            [*self.wrapper, sys.executable, "-m", "gateway", "run", "--config",
             str(self.config_path)], self.log_path, env=env, cwd=self.workdir)
        wait_for(self._ready, what="gateway /healthz")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of its log, without the DEBUG line of each rejected uplink, and a
        run of lines that differ only in their time as one line and a count."""
        kept: list[list[str | int]] = []  # [line, what it says without its time, times]
        for line in self.log().splitlines():
            if "level=DEBUG" in line:
                continue
            said = line.split(" ", 1)[-1]
            if kept and kept[-1][1] == said:
                kept[-1][2] = int(kept[-1][2]) + 1
            else:
                kept.append([line, said, 1])
        return "\n".join(f"{line}" + (f"  (x{n})" if n != 1 else "")
                         for line, _, n in kept[-lines:])

    def readyz(self) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz",
                                        timeout=5) as r:
                return int(r.status), r.read().decode().strip()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode().strip()

    def rejected(self, reason: str) -> float:
        return self.metric("nbiot_gateway_uplinks_rejected_total", {"reason": reason})

    # -- libfiu: failure points of the POSIX functions, switched at run time ---------------
    def fiu(self, command: str) -> None:
        """`enable name=posix/io/sync/fdatasync,failinfo=5`, `disable name=...`."""
        assert self.proc is not None
        run("fiu-ctrl", "-f", str(self.workdir / "fiu"), "-c", command, str(self.proc.pid))

    # -- libfaketime: the wall clock, stepped at run time ----------------------------------
    @property
    def clock_file(self) -> Path:
        return self.workdir / "faketime"

    def step_clock(self, offset_s: int) -> None:
        """Set the gateway's wall clock to real time + `offset_s` (it rereads the file
        within a second)."""
        self.clock_file.write_text(f"{offset_s:+d}\n")


GatewayFactory = Callable[..., FaultGateway]


@pytest.fixture
def fault_gateway(disks: Disks, broker: Broker, tmp_path: Path) -> Iterator[GatewayFactory]:
    """`fault_gateway(spool_dir=..., fiu=True, faketime=True, extra_toml=..., **env)`.
    Depends on `disks`, so the gateway is gone before its disk is unmounted."""
    made: list[FaultGateway] = []

    def _make(extra_toml: str = "", *, spool_dir: Path | None = None, fiu: bool = False,
              faketime: bool = False, start: bool = True, **env: str) -> FaultGateway:
        workdir = tmp_path / f"fgw{len(made)}"
        workdir.mkdir()
        gw = FaultGateway(workdir, broker.port, env_extra=dict(env))
        gw.write_config(extra_toml)
        if spool_dir is not None:  # liveness and downlink files go beside it
            gw.env_extra["NBIOT_SPOOL__PATH"] = str(spool_dir / "spool.sqlite")
        if fiu:
            require("fiu-run")
            # No failure point enabled at start: the test switches them with fiu-ctrl.
            gw.wrapper = ["fiu-run", "-x", "-f", str(workdir / "fiu")]
        if faketime:
            require(str(FAKETIME_LIB))
            gw.step_clock(0)
            gw.env_extra.update({
                "LD_PRELOAD": str(FAKETIME_LIB),
                "FAKETIME_TIMESTAMP_FILE": str(gw.clock_file),
                "FAKETIME_CACHE_DURATION": "1",
                # Only the wall clock jumps (an NTP step, a VM resumed); monotonic cannot.
                "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            })
        made.append(gw)
        if start:
            gw.start()
        return gw

    yield _make
    for gw in made:
        # Shown by pytest only when the test failed: what the gateway said last.
        print(f"--- {gw.log_path}, last lines:\n{gw.log_tail()}")
        if gw.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                gw.proc.send_signal(signal.SIGCONT)
            gw.kill()


# -- the witness --------------------------------------------------------------------------
Witness = Callable[[], Subscription]


@pytest.fixture
def witness(broker: Broker, tmp_path: Path) -> Iterator[Witness]:
    """mosquitto_sub on `nbiot/#` at QoS 0, on the broker as it is now (call it again after
    the broker restarts). QoS 0 on purpose: the witness then never sends the broker
    anything to read, so a broker killed with SIGKILL still hands the kernel's copy of what
    it wrote before a PUBACK to the witness, instead of resetting that connection."""
    started: list[Subscription] = []

    def _start() -> Subscription:
        n = len(started)
        started.append(start_subscription(broker, tmp_path / f"witness-{n}.txt", "nbiot/#",
                                          f"fault-witness-{n}", qos=0))
        return started[-1]

    yield _start
    stop_subscriptions(started)
