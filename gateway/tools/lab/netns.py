"""A lab of network namespaces on one machine: devices behind a balancer, gateway hosts and
broker nodes on one bridge, and the processes started in them. Root and Linux only.

It must never leave anything behind: every namespace, veth, bridge and process it made goes
on exit, on an exception and on SIGINT/SIGTERM, and a crashed run's leftovers with the same
prefix go at the next start.

    backbone 10.N.0.0/24 (bridge PREFIX-br in the root namespace, which is 10.N.0.254)
      lb 10.N.0.2   h1..hK 10.N.0.11..   b1..bM 10.N.0.21..
    device side 10.N+1.0.0/24 (one veth, dev <-> lb only)
      dev 10.N+1.0.100, default route via lb's 10.N+1.0.1, which is also the VIP
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType

VIP_PORT = 5683  # CoAP
DEFAULT_NET = 77
AUTO_NETS = range(100, 250, 2)  # net=None: the first free one, one lab at a time
MAX_HOSTS = MAX_BROKERS = 9  # 10.N.0.11..19 and 10.N.0.21..29
STOP_TIMEOUT_S = 10.0
LOCK_DIR = Path("/run/nbiot-lab")
# Short enough that PREFIX-br and PREFIX-hN stay within Linux's 15-character interface names.
_PREFIX = re.compile(r"[a-z][a-z0-9]{0,7}\Z")
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class LabError(Exception):
    """The lab could not be built (not root, a name or subnet in use, a command failed)."""


class LabInterrupted(BaseException):
    """SIGTERM or SIGHUP while the lab was up: raised in the main thread so that the lab's
    `with` block unwinds and tears everything down (SIGINT raises KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def leftovers(prefix: str) -> list[str]:
    """The namespaces and root-namespace links a lab with `prefix` made that still exist."""
    return [*_namespaces(prefix), *_root_links(prefix)]


def _namespaces(prefix: str) -> list[str]:
    listed = _ip("netns", "list").stdout.splitlines()
    return [line.split()[0] for line in listed if line.startswith(f"{prefix}-")]


def _root_links(prefix: str) -> list[str]:
    links = []
    for line in _ip("-o", "link", "show").stdout.splitlines():
        name = line.split(":", 2)[1].strip().split("@")[0]
        if name.startswith(f"{prefix}-"):
            links.append(name)
    return links


@contextlib.contextmanager
def _nets_lock() -> Iterator[None]:
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    with (LOCK_DIR / "nets.lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _free_net() -> int:
    """The first N from AUTO_NETS whose 10.N.0.0/24 the root namespace does not use."""
    used = _ip("-o", "-4", "addr", "show").stdout
    for net in AUTO_NETS:
        if f" 10.{net}.0." not in used:
            return net
    raise LabError("no free 10.N.0.0/24 for a lab: remove old labs (ip netns list)")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode:
        raise LabError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


class Lab:
    """`with Lab("nbg", hosts=3, brokers=3) as lab:` builds the namespaces `nbg-lb`,
    `nbg-dev`, `nbg-h1..3`, `nbg-b1..3`; `lab.popen("h1", argv)` runs a process in one of
    them. Namespaces are named by their short names ("lb", "dev", "h1", "b2") in the API.

    Two labs at once need different prefixes and different `net`s (both live in the root
    namespace's routing table); a second lab with a prefix in use is refused. `net=None`
    takes the first free one from 10.100 up (tests: they may run beside a demo).

    `software_checksums`: every veth computes and checks UDP and TCP checksums in software
    (ethtool -K rx off tx off), so a rewrite that breaks one gets the datagram dropped and
    counted (Udp InCsumErrors), where veth's offload would pass it unchecked."""

    def __init__(self, prefix: str = "nbg", hosts: int = 3, brokers: int = 3, *,
                 net: int | None = DEFAULT_NET, workdir: Path | None = None,
                 software_checksums: bool = False) -> None:
        if not _PREFIX.match(prefix):
            raise LabError(f"lab prefix {prefix!r}: 1-8 lowercase letters and digits, "
                           "starting with a letter")
        if not (1 <= hosts <= MAX_HOSTS and 0 <= brokers <= MAX_BROKERS):
            raise LabError(f"a lab has 1-{MAX_HOSTS} hosts and 0-{MAX_BROKERS} brokers")
        if net is not None and not 1 <= net <= 253:
            raise LabError(f"net {net}: the lab uses 10.{net}.0.0/24 and 10.{net + 1}.0.0/24")
        self.prefix = prefix
        self.hosts = [f"h{i}" for i in range(1, hosts + 1)]
        self.brokers = [f"b{j}" for j in range(1, brokers + 1)]
        self._want_net = net
        self.net = net or 0  # chosen at __enter__ when None
        self.vip_port = VIP_PORT
        self.bridge = f"{prefix}-br"
        self.software_checksums = software_checksums
        self._given_workdir = workdir
        self.workdir = workdir or Path("/nonexistent")
        self._processes: list[subprocess.Popen[bytes]] = []
        self._lock_fd: int | None = None
        self._old_handlers: dict[int, object] = {}

    # -- addresses and names -------------------------------------------------------------
    @property
    def vip(self) -> str:
        """The address devices send to: the balancer's end of the device link."""
        return f"10.{self.net + 1}.0.1"

    @property
    def device_ip(self) -> str:
        return f"10.{self.net + 1}.0.100"

    @property
    def balancer_ip(self) -> str:
        return f"10.{self.net}.0.2"

    @property
    def root_ip(self) -> str:
        """The root namespace's address on the backbone (tools running there use it)."""
        return f"10.{self.net}.0.254"

    def host_ip(self, i: int) -> str:
        """Gateway host `i` (1-based) on the backbone."""
        self._check_index(i, len(self.hosts), "host")
        return f"10.{self.net}.0.{10 + i}"

    def broker_ip(self, j: int) -> str:
        """Broker node `j` (1-based) on the backbone."""
        self._check_index(j, len(self.brokers), "broker")
        return f"10.{self.net}.0.{20 + j}"

    @staticmethod
    def _check_index(i: int, count: int, what: str) -> None:
        if not 1 <= i <= count:
            raise LabError(f"{what} {i}: the lab has {what}s 1..{count}")

    @property
    def namespaces(self) -> list[str]:
        """Short names of every namespace, balancer first."""
        return ["lb", "dev", *self.hosts, *self.brokers]

    def netns(self, short: str) -> str:
        """The kernel's name of a namespace (`nbg-h1` for "h1")."""
        if short not in self.namespaces:
            raise LabError(f"no namespace {short!r} in this lab ({', '.join(self.namespaces)})")
        return f"{self.prefix}-{short}"

    def backbone_ip(self, short: str) -> str:
        if short == "lb":
            return self.balancer_ip
        if short in self.hosts:
            return self.host_ip(int(short[1:]))
        if short in self.brokers:
            return self.broker_ip(int(short[1:]))
        raise LabError(f"{short!r} is not on the backbone")

    # -- processes -----------------------------------------------------------------------
    def popen(self, ns: str, argv: Sequence[str], *, log: Path | None = None,
              env: Mapping[str, str] | None = None, cwd: Path | None = None
              ) -> subprocess.Popen[bytes]:
        """Start `argv` in namespace `ns` in a process group of its own (so a Ctrl-C reaches
        only us, and `kill` reaches its children), output appended to `log` (default: a file
        in `workdir` named after the namespace and program). Stopped when the lab closes."""
        log = log or self.workdir / f"{ns}-{Path(argv[0]).name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.netns(ns), *argv],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})}, cwd=cwd,
                                    start_new_session=True)
        self._processes.append(proc)
        return proc

    def run(self, ns: str, argv: Sequence[str], *, check: bool = True, timeout_s: float = 30.0,
            input_text: str | None = None, env: Mapping[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in namespace `ns` to completion; LabError with its output if it fails
        (when `check`) or outlives `timeout_s`."""
        args = ["ip", "netns", "exec", self.netns(ns), *argv]
        try:
            result = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s,
                                    input=input_text, env={**os.environ, **(env or {})},
                                    stdin=None if input_text is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise LabError(f"in {ns}: {' '.join(argv)} still running after {timeout_s:g}s"
                           ) from None
        if check and result.returncode:
            raise LabError(f"in {ns}: {' '.join(argv)} exited {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()[-2000:]}")
        return result

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Send `sig` to `proc`'s whole process group (fault injection: SIGKILL is a host
        dying at once, without its children getting a word in)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def stop(self, proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM to `proc`'s group, SIGKILL after `timeout_s`; its exit code."""
        if proc.poll() is None:
            self.kill(proc, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill(proc, signal.SIGKILL)
                proc.wait()
        self.kill(proc, signal.SIGKILL)  # whatever of its group outlived it
        return proc.returncode

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> Lab:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, veth pairs, a bridge)")
        if shutil.which("ip") is None:
            raise LabError("the lab needs iproute2's `ip` (apt-get install iproute2)")
        self._lock()
        try:
            self._trap_signals()
            self._remove(_namespaces(self.prefix), _root_links(self.prefix))  # a crashed run's
            self.workdir = self._given_workdir or Path(tempfile.mkdtemp(
                prefix=f"nbiot-lab-{self.prefix}-"))
            self.workdir.mkdir(parents=True, exist_ok=True)
            with _nets_lock():  # choosing a subnet and claiming it, one lab at a time
                self.net = self._want_net or _free_net()
                self._check_subnet_free()
                self._build()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._teardown()

    def _teardown(self) -> None:
        # A second Ctrl-C must not cut the teardown short: signals wait until it is done.
        blocked = threading.current_thread() is threading.main_thread()
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            for proc in self._processes:
                if proc.poll() is None:
                    self.kill(proc, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for proc in self._processes:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(max(0.0, deadline - time.monotonic()))
                self.kill(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(STOP_TIMEOUT_S)
            self._processes.clear()
            self._remove(_namespaces(self.prefix), _root_links(self.prefix))
            if self._given_workdir is None and self.workdir.name.startswith("nbiot-lab-"):
                shutil.rmtree(self.workdir, ignore_errors=True)
            self._restore_signals()
            self._unlock()
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)

    def _lock(self) -> None:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_DIR / f"{self.prefix}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LabError(f"lab {self.prefix!r} is in use by pid {holder}: pick another "
                           "prefix (and net)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _trap_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; its owner must clean up itself

        def interrupted(signum: int, frame: FrameType | None) -> None:
            raise LabInterrupted(signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, interrupted)

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._old_handlers.clear()

    def _check_subnet_free(self) -> None:
        used = _ip("-o", "-4", "addr", "show", "to", f"10.{self.net}.0.0/24").stdout.strip()
        if used:
            raise LabError(f"10.{self.net}.0.0/24 is already in use in the root namespace "
                           f"({used.split()[1]}): another lab? Pick another net")

    # -- building and removing -----------------------------------------------------------
    def _build(self) -> None:
        br = self.bridge
        _ip("link", "add", br, "type", "bridge")
        _ip("addr", "add", f"{self.root_ip}/24", "dev", br)
        _ip("link", "set", br, "up")
        for short in self.namespaces:
            ns = self.netns(short)
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for short in ["lb", *self.hosts, *self.brokers]:
            ns, root_end = self.netns(short), f"{self.prefix}-{short}"
            _ip("link", "add", root_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", root_end, "master", br, "up")
            _ip("-n", ns, "addr", "add", f"{self.backbone_ip(short)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        lb, dev = self.netns("lb"), self.netns("dev")
        _ip("-n", dev, "link", "add", "eth0", "type", "veth", "peer", "name", "dev0", "netns", lb)
        _ip("-n", dev, "addr", "add", f"{self.device_ip}/24", "dev", "eth0")
        _ip("-n", dev, "link", "set", "eth0", "up")
        _ip("-n", dev, "route", "add", "default", "via", self.vip)
        _ip("-n", lb, "addr", "add", f"{self.vip}/24", "dev", "dev0")
        _ip("-n", lb, "link", "set", "dev0", "up")
        if self.software_checksums:
            self._checksums_in_software()
        for short in self.hosts:  # replies to devices cross the balancer
            _ip("-n", self.netns(short), "route", "add", "default", "via", self.balancer_ip)
        self.run("lb", ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
                        *(f"net.ipv4.conf.{i}.rp_filter=0" for i in
                          ("all", "default", "eth0", "dev0"))])

    def _checksums_in_software(self) -> None:
        if shutil.which("ethtool") is None:
            raise LabError("software_checksums needs ethtool (apt-get install ethtool)")
        ends: list[tuple[str | None, str]] = [
            (None, f"{self.prefix}-{short}") for short in ["lb", *self.hosts, *self.brokers]]
        ends += [(short, "eth0") for short in self.namespaces] + [("lb", "dev0")]
        for ns, link in ends:
            argv = ["ethtool", "-K", link, "rx", "off", "tx", "off"]
            if ns is None:
                subprocess.run(argv, check=True, capture_output=True, timeout=10)
            else:
                self.run(ns, argv)

    def _remove(self, namespaces: list[str], root_links: list[str]) -> None:
        for ns in namespaces:
            self.kill_everything_in(ns)
        for link in root_links:  # one end of a veth takes its peer along, synchronously
            _ip("link", "del", link, check=False)
        for ns in namespaces:
            _ip("netns", "del", ns, check=False)
        still = leftovers(self.prefix)
        if still:
            raise LabError(f"could not remove {', '.join(still)}")

    def kill_everything_in(self, ns: str) -> None:
        """SIGKILL every process in namespace `ns` (short or kernel name), daemons that left
        our process groups (epmd) included, and wait until they are gone."""
        ns = ns if ns.startswith(f"{self.prefix}-") else self.netns(ns)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        raise LabError(f"processes in {ns} survived SIGKILL for {STOP_TIMEOUT_S:g}s")
