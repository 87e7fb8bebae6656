"""`nbiot-gateway cluster-demo` (root, Linux): the whole cluster on one machine, under load
and under faults, and whether anything acknowledged was lost.

Network namespaces (gateway/tools/lab/netns.py): devices, the nf_tables balancer, 3 gateway
hosts, 3 RabbitMQ nodes with the uplink quorum queue. The simulated fleet runs through
the balancer's VIP; its witness subscribes on a broker node that is never killed. While
under load it kills one gateway host with SIGKILL (in broker-ack mode its state directory
is deleted too: the host is lost for good, and comes back empty), kills one broker node,
and the fleet's NAT rebinding moves devices between hosts. Then it reads the uplink
queue back (an independent consumer) and prints acked, delivered, lost, duplicates, each
host's share and how long the dead host's devices went unanswered; `--json` too.
Everything it starts it stops, also on Ctrl-C and on failure (the Lab's exit).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.tools.lab.netns import DEFAULT_NET, Lab, LabError
from gateway.tools.lab.rabbit import RabbitCluster, RabbitError
from gateway.tools.localstack import SHIPPED_CONFIG, StackError, http_get, wait_until

UPLINK_QUEUE = "nbiot-uplinks"
UPLINK_BINDING = "nbiot.plant.*.*.up"
PEER_PORT = 5690
METRICS_PORT = 9108
BALANCER_METRICS_PORT = 9109
READY_TIMEOUT_S = 60.0
SIM_GRACE_S = 20.0  # after the fleet's window: retries, the witness catching up
HOSTS = ("h1", "h2", "h3")
# h2 dies; b2, the node h1 is connected to, dies (h1 fails over); the witness is on b1.
VICTIM_HOST, VICTIM_BROKER, WITNESS_BROKER = "h2", "b2", 1


class DemoFailed(StackError):
    """Something the demo needs did not start or behave (as StackError: a wait timed out)."""


@dataclass
class Fault:
    what: str
    at_s: float  # since the fleet started
    noticed_s: float | None = None  # until the balancer and every live peer acted on it


@dataclass
class Report:
    ack_mode: str
    devices: int
    interval_s: float
    duration_s: float
    sent: int = 0
    acked: int = 0
    delivered: int = 0
    lost: int = 0
    duplicates_delivered: int = 0
    service_unavailable: int = 0
    timeouts: int = 0
    ack_p50_ms: float | None = None
    ack_p99_ms: float | None = None
    ack_max_ms: float | None = None
    queue_messages: int = 0
    queue_distinct: int = 0
    queue_duplicates: list[str] = field(default_factory=list)
    # What the gateways themselves found: seqs two hosts both accepted across a takeover
    # (nbiot_gateway_cluster_duplicates_total, summed over the hosts).
    gateway_duplicates: int = 0
    share: dict[str, int] = field(default_factory=dict)  # host -> uplinks it accepted
    relayed: dict[str, int] = field(default_factory=dict)  # host -> datagrams relayed to it
    faults: list[Fault] = field(default_factory=list)
    unanswered_s: float | None = None  # the dead host's devices: kill -> served again
    broker_failovers: dict[str, int] = field(default_factory=dict)  # host -> reconnects
    ok: bool = False
    verdict: str = ""


# -- configuration of each piece ------------------------------------------------------------
def host_config(lab: Lab, rabbit: RabbitCluster, name: str, ack: str, secret: str,
                workdir: Path, hosts: Sequence[str] = HOSTS) -> Path:
    """Gateway host `name`'s config file in `workdir`, in a cluster of `hosts`; its spool in
    `workdir/name/`, the registry `workdir/devices.csv`."""
    ip = lab.backbone_ip(name)
    # Each host prefers another node (h1 b2, h2 b3, h3 b1): killing one moves a host.
    nodes = rabbit.mqtt_addresses()
    first = HOSTS.index(name) + 1
    brokers = ", ".join(f'"{a}"' for a in nodes[first:] + nodes[:first])
    apis = ", ".join(f'"http://{n.ip}:15672"' for n in rabbit.nodes)
    peers = "\n".join(f'{h} = "{lab.backbone_ip(h)}:{PEER_PORT}"' for h in hosts)
    base = SHIPPED_CONFIG.read_text()
    text = (f'[gateway]\nid = "gw-{name}"\ntenant = "plant"\nshutdown_grace_s = 5.0\n\n'
            f'[coap]\nbind = "{ip}"\nport = {lab.vip_port}\noverload_max_age_s = 5\n\n'
            f'[mqtt]\nbrokers = [{brokers}]\nusername = "{rabbit.user}"\n'
            f'password = "{rabbit.password}"\nreconnect_min_s = 0.2\nreconnect_max_s = 2.0\n\n'
            f'[spool]\npath = "{workdir / name / "spool.sqlite"}"\n\n'
            f'[metrics]\nbind = "{ip}"\nport = {METRICS_PORT}\n\n'
            f'[registry]\npath = "{workdir / "devices.csv"}"\n\n'
            f'[cluster]\nenabled = true\nhost = "{name}"\nsecret = "{secret}"\nack = "{ack}"\n'
            f'broker_api = [{apis}]\n\n[cluster.hosts]\n{peers}\n\n'
            + base[base.index("[types."):])
    path = workdir / f"{name}.toml"
    path.write_text(text)
    return path


def sim_config(lab: Lab, rabbit: RabbitCluster, workdir: Path, devices: int,
               interval_s: float, duration_s: float, seed: int) -> Path:
    base = SHIPPED_CONFIG.read_text()
    witness = rabbit.nodes[WITNESS_BROKER - 1]
    text = (f'[mqtt]\nhost = "{witness.ip}"\nport = 1883\nusername = "{rabbit.user}"\n'
            f'password = "{rabbit.password}"\n\n'
            f'[registry]\npath = "{workdir / "devices.csv"}"\n\n'
            f'[sim]\nhost = "{lab.vip}"\nport = {lab.vip_port}\ndevices = {devices}\n'
            f'interval_s = {interval_s}\nduration_s = {duration_s}\nseed = {seed}\n'
            f'source_addresses = "shared"\nnat_rebind_probability = 0.3\n'
            f'drain_s = {SIM_GRACE_S}\ngrace_s = {SIM_GRACE_S}\n\n'
            + base[base.index("[types."):])
    path = workdir / "sim.toml"
    path.write_text(text)
    return path


# -- reading the pieces ---------------------------------------------------------------------
def scrape(ip: str, port: int) -> dict[str, float]:
    """One /metrics, as name{labels} -> value; {} if it does not answer."""
    status, body = http_get(f"http://{ip}:{port}/metrics")
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out


class ClusterDemo:
    def __init__(self, *, ack: str, devices: int, interval_s: float, duration_s: float,
                 seed: int, prefix: str, workdir: Path, net: int = DEFAULT_NET) -> None:
        self.net = net
        self.ack, self.devices, self.interval_s = ack, devices, interval_s
        self.duration_s, self.seed, self.prefix, self.workdir = duration_s, seed, prefix, workdir
        self.secret = secrets.token_hex(16)
        self.report = Report(ack, devices, interval_s, duration_s)
        self.gateways: dict[str, subprocess.Popen[bytes]] = {}

    def run(self) -> Report:
        from gateway.config import load_config
        from gateway.tools.sim.registry_file import make_registry

        settings = load_config(SHIPPED_CONFIG)
        make_registry(self.workdir / "devices.csv", self.devices, settings.types,
                      max(1, round(self.interval_s)))
        with Lab(self.prefix, hosts=len(HOSTS), brokers=3, workdir=self.workdir,
                 net=self.net) as lab:
            for j in range(1, 4):  # the witness in the device namespace reaches the brokers
                lab.run(f"b{j}", ["ip", "route", "add", f"{lab.device_ip}/32", "via",
                                  lab.balancer_ip])
            say(f"lab up: VIP {lab.vip}:{lab.vip_port}, hosts "
                f"{', '.join(lab.backbone_ip(h) for h in HOSTS)}; starting 3 RabbitMQ nodes")
            with RabbitCluster(lab, 3) as rabbit:
                rabbit.declare_uplink_queue(UPLINK_QUEUE, UPLINK_BINDING)
                say(f"RabbitMQ cluster up ({', '.join(rabbit.mqtt_addresses())}), quorum "
                    f"queue {UPLINK_QUEUE} bound to {UPLINK_BINDING}")
                self._run_in(lab, rabbit)
        return self.report

    def _run_in(self, lab: Lab, rabbit: RabbitCluster) -> None:
        configs = {h: host_config(lab, rabbit, h, self.ack, self.secret, self.workdir)
                   for h in HOSTS}
        for h in HOSTS:
            self._start_gateway(lab, h, configs[h])
        wait_until(lambda: all(self._hears(lab, h, len(HOSTS)) for h in HOSTS),
                   READY_TIMEOUT_S, "every gateway host ready and hearing its peers")
        balancer = lab.popen("lb", [sys.executable, "-m", "gateway", "balancer", "--vip",
                                    lab.vip, "--metrics-bind", lab.balancer_ip,
                                    "--metrics-port", str(BALANCER_METRICS_PORT),
                                    *(a for h in HOSTS for a in
                                      ("--backend", f"{h}={lab.backbone_ip(h)}"))],
                             log=self.workdir / "balancer.log")
        wait_until(lambda: self._backends_up(lab) == len(HOSTS), READY_TIMEOUT_S,
                   "the balancer sees every gateway host")
        say(f"3 gateway hosts (cluster.ack = {self.ack}) and the balancer up; fleet of "
            f"{self.devices} devices, a report every {self.interval_s:g} s, for "
            f"{self.duration_s:g} s")
        sim_json = self.workdir / "sim.json"
        sim = lab.popen("dev", [sys.executable, "-m", "gateway", "sim", "--config",
                                str(sim_config(lab, rabbit, self.workdir, self.devices,
                                               self.interval_s, self.duration_s, self.seed)),
                                "--json", str(sim_json), "--no-progress"],
                        log=self.workdir / "sim.log")
        started = time.monotonic()
        self._faults(lab, rabbit, configs, started, sim)
        if sim.wait() not in (0, 1):
            raise DemoFailed(f"the simulator failed: {tail(self.workdir / 'sim.log')}")
        self._read_results(lab, rabbit, sim_json)
        for h in HOSTS:
            lab.stop(self.gateways[h])
        lab.stop(balancer)

    def _start_gateway(self, lab: Lab, name: str, config: Path) -> None:
        self.gateways[name] = lab.popen(name, [sys.executable, "-m", "gateway", "run",
                                               "--config", str(config)],
                                        log=self.workdir / f"{name}.log")

    def _hears(self, lab: Lab, name: str, hosts: int) -> bool:
        proc = self.gateways[name]
        if proc.poll() is not None:
            raise DemoFailed(f"gateway {name} exited {proc.returncode}: "
                             f"{tail(self.workdir / f'{name}.log')}")
        m = scrape(lab.backbone_ip(name), METRICS_PORT)
        return m.get("nbiot_gateway_cluster_hosts_alive") == hosts

    def _backends_up(self, lab: Lab) -> int:
        m = scrape(lab.balancer_ip, BALANCER_METRICS_PORT)
        return int(sum(v for k, v in m.items() if k.startswith("nbiot_balancer_backend_up")))

    def _faults(self, lab: Lab, rabbit: RabbitCluster, configs: dict[str, Path],
                started: float, sim: subprocess.Popen[bytes]) -> None:
        """Kill a gateway host at 30 % of the window, a broker node at 50 %, bring the host
        back at 70 %; measure how long each took to be noticed."""
        others = [h for h in HOSTS if h != VICTIM_HOST]

        def at(share: float) -> None:
            delay = started + share * self.duration_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)

        at(0.3)
        lab.kill(self.gateways[VICTIM_HOST], signal.SIGKILL)
        killed = time.monotonic()
        what = f"kill -9 gateway host {VICTIM_HOST}"
        if self.ack == "broker":
            shutil.rmtree(self.workdir / VICTIM_HOST)
            what += " and delete its state directory"
        fault = Fault(what, round(killed - started, 1))
        self.report.faults.append(fault)
        say(f"fault: {what}")
        noticed = wait_until(lambda: self._backends_up(lab) == 2 and all(
            self._hears(lab, h, 2) for h in others), 30, f"{VICTIM_HOST}'s death noticed")
        fault.noticed_s = round(noticed, 2)
        self.report.unanswered_s = fault.noticed_s
        say(f"  noticed by the balancer and both peers after {noticed:.2f}s")

        at(0.5)
        rabbit.kill9(VICTIM_BROKER)
        self.report.faults.append(Fault(f"kill -9 broker node {VICTIM_BROKER}",
                                        round(time.monotonic() - started, 1)))
        say(f"fault: kill -9 broker node {VICTIM_BROKER}")

        at(0.7)
        (self.workdir / VICTIM_HOST).mkdir(exist_ok=True)
        self._start_gateway(lab, VICTIM_HOST, configs[VICTIM_HOST])
        back = time.monotonic()
        returned = wait_until(lambda: self._backends_up(lab) == 3 and all(
            self._hears(lab, h, 3) for h in HOSTS), 60, f"{VICTIM_HOST} back")
        self.report.faults.append(Fault(f"restart gateway host {VICTIM_HOST}",
                                        round(back - started, 1), round(returned, 2)))
        say(f"  {VICTIM_HOST} restarted; its devices back with it after {returned:.2f}s")
        if sim.poll() is not None:
            return

    def _read_results(self, lab: Lab, rabbit: RabbitCluster, sim_json: Path) -> None:
        r = self.report
        summary = json.loads(sim_json.read_text())
        counts = summary.get("counts", summary)
        for name in ("sent", "acked", "delivered", "lost", "duplicates_delivered",
                     "service_unavailable", "timeouts"):
            setattr(r, name, int(counts.get(name, 0)))
        ack = summary.get("ack_latency_ms", {})
        r.ack_p50_ms, r.ack_p99_ms, r.ack_max_ms = ack.get("p50"), ack.get("p99"), ack.get("max")
        for h in HOSTS:
            m = scrape(lab.backbone_ip(h), METRICS_PORT)
            r.share[h] = int(m.get("nbiot_gateway_uplinks_accepted_total", 0))
            r.relayed[h] = int(m.get("nbiot_gateway_cluster_relayed_datagrams_total", 0))
            r.broker_failovers[h] = int(m.get("nbiot_gateway_mqtt_reconnects_total", 0))
        # Wait for every host's spool to be published, then read the queue back.
        wait_until(lambda: all(scrape(lab.backbone_ip(h), METRICS_PORT).get(
            "nbiot_gateway_spool_records", 1) == 0 for h in HOSTS), 60, "spools published")
        r.gateway_duplicates = sum(int(scrape(lab.backbone_ip(h), METRICS_PORT).get(
            "nbiot_gateway_cluster_duplicates_total", 0)) for h in HOSTS)
        seen: Counter[tuple[str, int]] = Counter()
        messages = rabbit.drain_queue(UPLINK_QUEUE)
        for _, payload in messages:
            body = json.loads(payload)
            seen[(body["device_id"], body["seq"])] += 1
        r.queue_messages = len(messages)
        r.queue_distinct = len(seen)
        r.queue_duplicates = [f"{d}/{s}" for (d, s), n in sorted(seen.items()) if n > 1][:50]
        r.ok = r.lost == 0 and r.acked > 0 and r.queue_distinct >= r.delivered
        r.verdict = ("nothing acknowledged was lost" if r.ok else
                     f"LOST {r.lost} acknowledged uplinks" if r.lost else
                     "the queue holds fewer uplinks than the witness saw")


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def say(line: str) -> None:
    print(f"cluster-demo: {line}", file=sys.stderr, flush=True)


def format_report(r: Report) -> str:
    rows = [
        ("ack mode", r.ack_mode),
        ("fleet", f"{r.devices} devices every {r.interval_s:g} s for {r.duration_s:g} s"),
        ("sent / acked", f"{r.sent} / {r.acked} "
                         f"(5.03 answered {r.service_unavailable}, timeouts {r.timeouts})"),
        ("delivered", f"{r.delivered} seen by the witness, duplicates {r.duplicates_delivered}"),
        ("lost", f"{r.lost}"),
        ("uplink queue", f"{r.queue_messages} messages, {r.queue_distinct} distinct "
                         f"(device, seq), {len(r.queue_duplicates)} duplicated; "
                         f"the gateways counted {r.gateway_duplicates} taken-over duplicates"),
        ("ack latency", f"p50 {r.ack_p50_ms} ms, p99 {r.ack_p99_ms} ms, max {r.ack_max_ms} ms"),
        ("share (accepted)", ", ".join(f"{h} {n}" for h, n in r.share.items())),
        ("relayed to owner", ", ".join(f"{h} {n}" for h, n in r.relayed.items())),
        ("broker reconnects", ", ".join(f"{h} {n}" for h, n in r.broker_failovers.items())
         + f" (each host prefers another node; {VICTIM_BROKER} was killed)"),
        ("dead host unanswered", f"{r.unanswered_s} s until the balancer and its peers "
                                 "moved its devices (then one device retransmission)"),
    ]
    rows += [(f"fault at {f.at_s:g}s", f.what + (f" (noticed in {f.noticed_s}s)"
                                                 if f.noticed_s is not None else ""))
             for f in r.faults]
    width = max(len(n) for n, _ in rows)
    return "\n".join(f"  {n:<{width}}  {v}" for n, v in rows) + f"\n  verdict: {r.verdict}"


def run_cluster_demo(*, ack: str, devices: int, interval_s: float, duration_s: float,
                     seed: int, prefix: str, json_path: Path | None, keep: bool) -> int:
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="nbiot-cluster-demo-"))
        if not keep:
            stack.callback(shutil.rmtree, workdir, True)
        demo = ClusterDemo(ack=ack, devices=devices, interval_s=interval_s,
                           duration_s=duration_s, seed=seed, prefix=prefix, workdir=workdir)
        try:
            report = demo.run()
        except (StackError, LabError, RabbitError) as e:
            print(f"cluster-demo failed: {e}\n  (logs in {workdir}, kept)", file=sys.stderr)
            stack.pop_all()
            return 2
        except KeyboardInterrupt:
            print("cluster-demo interrupted: everything it started is stopped", file=sys.stderr)
            return 130
        print(format_report(report))
        if json_path is not None:
            json_path.write_text(json.dumps(asdict(report), indent=2))
        return 0 if report.ok else 1

