"""`nbiot-gateway balancer` in a lab's balancer namespace, and what it reports (which
backends it counts as up, how many slots each holds), read from its /metrics.

It only starts and watches the operator's tool (gateway/tools/balancer.py); it never
installs rules of its own."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from gateway.tools import balancer as tool
from gateway.tools.lab.netns import Lab
from gateway.tools.localstack import StackError, http_get, wait_until

METRICS_PORT = 9100
START_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class BalancerState:
    up: dict[str, bool]  # backend name -> answering
    slots: dict[str, int]  # backend name -> slots it holds


@dataclass
class LabBalancer:
    lab: Lab
    proc: subprocess.Popen[bytes]
    backends: Sequence[tool.Backend]
    metrics_url: str

    def state(self) -> BalancerState | None:
        """What the checker reports now; None while its /metrics does not answer."""
        status, body = http_get(self.metrics_url)
        if status != 200:
            return None
        up: dict[str, bool] = {}
        slots: dict[str, int] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == f"{tool.NS}_backend_up":
                    up[sample.labels["backend"]] = sample.value == 1
                elif sample.name == f"{tool.NS}_backend_slots":
                    slots[sample.labels["backend"]] = int(sample.value)
        return BalancerState(up, slots)

    def wait_for(self, up: set[str], timeout_s: float = START_TIMEOUT_S) -> float:
        """Wait until exactly the backends `up` are up and hold every slot; the seconds
        it took (measured here, in one command: this VM's clock may pause between them)."""
        started = time.monotonic()

        def reached() -> bool:
            if self.proc.poll() is not None:
                raise StackError(f"the balancer exited with {self.proc.returncode}")
            state = self.state()
            return (state is not None and {n for n, ok in state.up.items() if ok} == up
                    and sum(state.slots.get(n, 0) for n in up) == tool.SLOTS)

        wait_until(reached, timeout_s, f"the balancer to count {sorted(up)} up")
        return time.monotonic() - started


@contextlib.contextmanager
def lab_balancer(lab: Lab, backends: Sequence[tool.Backend] | None = None, *,
                 interval_s: float = tool.PROBE_INTERVAL_S,
                 down_after: int = tool.DOWN_AFTER_MISSES, up_after: int = tool.UP_AFTER_ANSWERS,
                 metrics_port: int = METRICS_PORT) -> Iterator[LabBalancer]:
    """The checker in namespace "lb" on `lab.vip` over `backends` (default: every host on
    the CoAP port), its metrics on the balancer's backbone address; yielded once its table
    is installed (whoever answers by then counts as up); SIGTERM (table removed) on exit."""
    backends = backends or [tool.Backend(h, lab.host_ip(i + 1)) for i, h in enumerate(lab.hosts)]
    argv = [sys.executable, "-m", "gateway", "balancer", "--vip", lab.vip,
            "--port", str(lab.vip_port), "--interval", str(interval_s),
            "--down-after", str(down_after), "--up-after", str(up_after),
            "--metrics-bind", lab.balancer_ip, "--metrics-port", str(metrics_port),
            *(f"--backend={b.name}={b.ip}:{b.port}" for b in backends)]
    proc = lab.popen("lb", argv, log=lab.workdir / "balancer.log")
    running = LabBalancer(lab, proc, backends, f"http://{lab.balancer_ip}:{metrics_port}/metrics")
    try:
        def installed() -> bool:
            if proc.poll() is not None:
                tail = (lab.workdir / "balancer.log").read_text(errors="replace")[-2000:]
                raise StackError(f"the balancer exited with {proc.returncode}:\n{tail}")
            state = running.state()
            return state is not None and sum(state.slots.values()) == tool.SLOTS

        wait_until(installed, START_TIMEOUT_S, "the balancer's table")
        yield running
    finally:
        lab.stop(proc)
