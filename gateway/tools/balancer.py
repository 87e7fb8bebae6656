"""`nbiot-gateway balancer`: the gateway cluster's device-facing UDP balancer, in the
kernel's nf_tables, and the health checker that keeps it on the live gateway hosts.

Stateless NAT, no conntrack (docs/decisions.md): a datagram to the VIP gets a backend's
address by a hash of the device's address and port over a fixed number of slots; a backend's
datagram from its CoAP port leaves with the VIP's. The checker CoAP-pings every backend and
moves a dead backend's slots, and only those, to the live ones. It must never leave the map
pointing nowhere: with every backend down, each slot stays on its own backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import signal
import subprocess
import time
from collections import Counter as Tally
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from gateway.ingest.coap import wire
from gateway.ingest.coap.numbers import CON, EMPTY, RST
from gateway.runtime.metrics import MetricsServer

log = logging.getLogger("gateway.balancer")
TABLE = "nbiot_balancer"
COAP_PORT = 5683
# 60 slots split evenly over 2, 3, 4, 5 or 6 backends; a backend's death moves 1/N of them.
SLOTS = 60
# A fixed hash seed: a restarted checker installs the same hash, so no flow moves.
HASH_SEED = 0x6E626777
PROBE_INTERVAL_S = 0.2
DOWN_AFTER_MISSES = 3
UP_AFTER_ANSWERS = 2
NS = "nbiot_balancer"
TABLE_CHECK_S = 2.0  # how often the checker makes sure its table is still there


class BalancerError(Exception):
    """nft refused the table or the map, or the arguments make no balancer."""


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    ip: str
    port: int = COAP_PORT

    def __str__(self) -> str:
        return f"{self.name} {self.ip}:{self.port}"


def parse_backend(text: str) -> Backend:
    """`h1=10.77.0.11` or `h1=10.77.0.11:5684`."""
    name, sep, address = text.partition("=")
    ip, _, port = address.partition(":")
    try:
        if not (sep and name.isidentifier()):
            raise ValueError
        ipaddress.IPv4Address(ip)
        backend = Backend(name, ip, int(port) if port else COAP_PORT)
        if not 0 < backend.port < 65536:
            raise ValueError
    except ValueError:
        raise BalancerError(f"backend {text!r}: expected NAME=IPv4[:PORT], e.g. "
                            "h1=10.77.0.11") from None
    return backend


# -- the ruleset --------------------------------------------------------------------------
def render_ruleset(vip: str, vip_port: int, backends: Sequence[Backend],
                   slots: int = SLOTS) -> str:
    """The whole table, for `nft -f`: replaces an older one in the same transaction. The
    slot maps come empty; `render_slot_maps` fills them."""
    slot = f"jhash ip saddr . udp sport mod {slots} seed {HASH_SEED:#x}"
    members = ", ".join(f"{b.ip} . {b.port}" for b in backends)
    return f"""\
table ip {TABLE}
delete table ip {TABLE}
table ip {TABLE} {{
    # slot -> backend address and port; rewritten whole when a backend goes or comes back
    map slot_addr {{ typeof numgen inc mod {slots} : ip daddr; }}
    map slot_port {{ typeof numgen inc mod {slots} : udp dport; }}
    # every configured backend, up or down: a late reply from any of them leaves as the VIP
    set backends {{ type ipv4_addr . inet_service; elements = {{ {members} }}; }}

    chain prerouting {{
        type filter hook prerouting priority raw; policy accept;
        # a device's datagram: the backend of its slot, the device's address kept
        ip daddr {vip} udp dport {vip_port} notrack \\
            ip daddr set {slot} map @slot_addr \\
            udp dport set {slot} map @slot_port
        ip saddr . udp sport @backends notrack
    }}

    chain postrouting {{
        type filter hook postrouting priority srcnat; policy accept;
        # a backend's reply or downlink, however late: from the VIP
        ip saddr . udp sport @backends ip saddr set {vip} udp sport set {vip_port}
    }}
}}
"""


def render_slot_maps(assignment: Sequence[Backend]) -> str:
    """Both slot maps replaced, for `nft -f` (one transaction: no datagram sees a half map)."""
    addrs = _elements([f"{i} : {b.ip}" for i, b in enumerate(assignment)])
    ports = _elements([f"{i} : {b.port}" for i, b in enumerate(assignment)])
    return (f"flush map ip {TABLE} slot_addr\nflush map ip {TABLE} slot_port\n"
            f"add element ip {TABLE} slot_addr {{{addrs}}}\n"
            f"add element ip {TABLE} slot_port {{{ports}}}\n")


def _elements(items: Sequence[str], per_line: int = 6) -> str:
    lines = [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]
    return "\n    " + ",\n    ".join(lines) + "\n"


def assign_slots(backends: Sequence[Backend], up: set[str], slots: int = SLOTS) -> list[Backend]:
    """Slot i's backend. Slot i belongs to backends[i % N]; while that one is down, the slot
    goes to the live backend holding the fewest, ties by order. So a death moves only the
    dead backend's slots, and its return takes back exactly those. With none up, every slot
    stays home: an unanswered datagram is no worse than one sent nowhere."""
    homes = [backends[i % len(backends)] for i in range(slots)]
    live = [b for b in backends if b.name in up]
    if not live:
        return homes
    held = Tally({b.name: 0 for b in live})
    held.update(h.name for h in homes if h.name in up)
    assignment = []
    for home in homes:
        if home.name in up:
            assignment.append(home)
            continue
        taker = min(live, key=lambda b: held[b.name])
        held[taker.name] += 1
        assignment.append(taker)
    return assignment


def nft(script: str) -> None:
    """Apply `script` with `nft -f -`: one transaction, all or nothing. Blocking (~5 ms),
    and called only when a backend changes state, so the probe loop can wait for it."""
    try:
        result = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BalancerError(f"cannot run nft ({e}): apt-get install nftables, run as root"
                            ) from None
    if result.returncode:
        raise BalancerError(f"nft refused the change: {result.stderr.strip()}")


# -- metrics ------------------------------------------------------------------------------
class BalancerMetrics:
    def __init__(self, backends: Sequence[Backend], registry: CollectorRegistry | None = None
                 ) -> None:
        self.registry = registry or CollectorRegistry()
        self.up = Gauge(f"{NS}_backend_up", "1 while the backend answers CoAP pings, 0 once it "
                        "missed --down-after in a row (its slots went to the others)",
                        ["backend"], registry=self.registry)
        self.slots = Gauge(f"{NS}_backend_slots", "Slots of the balancer's hash that send "
                           "devices to this backend now", ["backend"], registry=self.registry)
        self.slots_moved = Counter(f"{NS}_slots_moved_total", "Slots given to another backend "
                                   "(each moves 1/slots of the devices): a backend went or "
                                   "came back", registry=self.registry)
        self.pings_missed = Counter(f"{NS}_backend_pings_missed_total", "CoAP pings the "
                                    "backend did not answer in time", ["backend"],
                                    registry=self.registry)
        self.map_errors = Counter(f"{NS}_map_update_errors_total", "Slot map rewrites nft "
                                  "refused, even with the whole table: the map is stale, see "
                                  "the log", registry=self.registry)
        for b in backends:
            self.up.labels(b.name)
            self.pings_missed.labels(b.name)


# -- health checking ----------------------------------------------------------------------
@dataclass(slots=True)
class BackendHealth:
    backend: Backend
    up: bool
    misses: int = 0
    answers: int = 0
    awaited_mid: int | None = None  # the message id of the ping in flight
    answered: bool = False


class _PingProtocol(asyncio.DatagramProtocol):
    """One unconnected UDP socket for every backend (one without a route yet is simply not
    answering): an RST from a backend's address with its awaited message id is an answer."""

    def __init__(self, health: Sequence[BackendHealth]) -> None:
        self.by_address = {(h.backend.ip, h.backend.port): h for h in health}

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        health = self.by_address.get(addr[:2])
        if health is None:
            return
        with contextlib.suppress(wire.CoapFormatError):
            reply = wire.decode(data)
            if reply.mtype == RST and reply.mid == health.awaited_mid:
                health.answered = True

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable, no route: the ping goes unanswered, which is all that counts


@dataclass
class Balancer:
    """Installs the table, pings every backend every `interval_s`, marks one down after
    `down_after` misses in a row and up after `up_after` answers (not separated by
    `down_after` misses), and rewrites the slot map on each change. `run` until `shutdown`
    is set, then removes the table."""

    vip: str
    backends: Sequence[Backend]
    vip_port: int = COAP_PORT
    slots: int = SLOTS
    interval_s: float = PROBE_INTERVAL_S
    down_after: int = DOWN_AFTER_MISSES
    up_after: int = UP_AFTER_ANSWERS
    metrics: BalancerMetrics = field(init=False)

    def __post_init__(self) -> None:
        names = [b.name for b in self.backends]
        if not names or len(set(names)) != len(names):
            raise BalancerError("give each backend once, with a name of its own")
        if self.interval_s <= 0 or self.down_after < 1 or self.up_after < 1:
            raise BalancerError("the ping interval must be positive, --down-after and "
                                "--up-after at least 1")
        if len(self.backends) > self.slots:
            raise BalancerError(f"{len(self.backends)} backends need more than {self.slots} slots")
        self.metrics = BalancerMetrics(self.backends)
        self._health = [BackendHealth(b, up=False) for b in self.backends]
        self._assignment: list[Backend] = []  # what the kernel's map says
        # changes nft refused to apply: tried again each round until it takes them
        self._unapplied: list[BackendHealth] = []
        self._mids = itertools.count(1)

    @property
    def up(self) -> set[str]:
        return {h.backend.name for h in self._health if h.up}

    async def run(self, shutdown: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _PingProtocol(self._health), local_addr=("0.0.0.0", 0))
        try:
            await self._probe_round(transport, shutdown)  # who is there before the first map
            for health in self._health:
                health.up = health.answered
            self._install()
            rounds = 0
            while not shutdown.is_set():
                await self._probe_round(transport, shutdown)
                self._judge()
                rounds += 1
                if rounds % max(1, round(TABLE_CHECK_S / self.interval_s)) == 0:
                    self._check_table()
        finally:
            transport.close()
            self._remove()

    async def _probe_round(self, transport: asyncio.DatagramTransport,
                           shutdown: asyncio.Event) -> None:
        """One ping to each backend, then `interval_s` for the answers (a live gateway
        answers in well under a millisecond; a loaded one in tens)."""
        for health in self._health:
            mid = next(self._mids) % 0x10000
            health.awaited_mid, health.answered = mid, False
            with contextlib.suppress(OSError):
                transport.sendto(wire.encode(wire.Message(CON, EMPTY, mid)),
                                 (health.backend.ip, health.backend.port))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(shutdown.wait(), self.interval_s)

    def _judge(self) -> None:
        changed = []
        for health in self._health:
            # Up after `up_after` answers not separated by `down_after` misses in a row:
            # libcoap's server, for one, answers only every other ping of a quick series.
            if health.answered:
                health.answers, health.misses = health.answers + 1, 0
            else:
                health.misses += 1
                if health.misses >= self.down_after:
                    health.answers = 0
                self.metrics.pings_missed.labels(health.backend.name).inc()
            if health.up and health.misses >= self.down_after:
                health.up = False
                changed.append(health)
            elif not health.up and health.answers >= self.up_after:
                health.up = True
                changed.append(health)
        pending = self._unapplied + [h for h in changed if h not in self._unapplied]
        if pending:
            self._reassign(pending)

    def _install(self) -> None:
        assignment = assign_slots(self.backends, self.up, self.slots)
        nft(render_ruleset(self.vip, self.vip_port, self.backends, self.slots)
            + render_slot_maps(assignment))
        self._assignment = assignment  # installed: from now on, removed at the end
        self._publish_state()
        down = [str(h.backend) for h in self._health if not h.up]
        log.info("balancer table %s installed: %s:%d over %s%s", TABLE, self.vip,
                 self.vip_port, ", ".join(map(str, self.backends)),
                 f"; not answering, their slots went to the others: {', '.join(down)}"
                 if down and self.up else "")
        if not self.up:
            log.error("no backend answers CoAP pings: every slot stays on its own backend; "
                      "check that the gateways run and that this host reaches them")

    def _check_table(self) -> None:
        """Put the table back if someone removed it (`nft flush ruleset`, a reload of
        nftables.service without our file): until then the VIP balances nothing."""
        listed = subprocess.run(["nft", "list", "table", "ip", TABLE], capture_output=True,
                                timeout=10)
        if listed.returncode == 0:
            return
        log.error("the balancer table %s is gone (nft flush ruleset? a reload of "
                  "nftables.service?): installing it again", TABLE)
        try:
            nft(render_ruleset(self.vip, self.vip_port, self.backends, self.slots)
                + render_slot_maps(self._assignment))
        except BalancerError as e:
            self.metrics.map_errors.inc()
            log.error("%s; trying again in %g s", e, TABLE_CHECK_S)

    def _reassign(self, changed: Sequence[BackendHealth]) -> None:
        before = self._assignment
        after = assign_slots(self.backends, self.up, self.slots)
        try:
            nft(render_slot_maps(after))
        except BalancerError as e:
            # The table itself may be gone (`nft flush ruleset`, a reload of nftables.service
            # without our file): put all of it back.
            log.error("%s; installing the whole table again", e)
            try:
                nft(render_ruleset(self.vip, self.vip_port, self.backends, self.slots)
                    + render_slot_maps(after))
            except BalancerError as again:
                self.metrics.map_errors.inc()
                if not self._unapplied:
                    log.error("%s; devices still go by the old map, retrying every ping "
                              "round", again)
                self._unapplied = list(changed)
                return
        self._unapplied = []
        self._assignment = after
        moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
        self.metrics.slots_moved.inc(len(moved))
        self._publish_state()
        for health in changed:
            self._log_change(health, moved)

    def _log_change(self, health: BackendHealth, moved: Sequence[tuple[Backend, Backend]]) -> None:
        b = health.backend
        if health.up:
            taken = sorted({old.name for old, new in moved if new == b})
            log.info("backend %s up after %d answered pings; takes back %d slots from %s",
                     b, self.up_after, sum(1 for _, new in moved if new == b),
                     ", ".join(taken) or "nobody")
            return
        given = sorted({new.name for old, new in moved if old == b})
        count = sum(1 for old, _ in moved if old == b)
        if not self.up:
            log.error("backend %s down after %d missed pings, and no backend answers: every "
                      "slot stays on its own backend; check the gateways and this host's "
                      "network", b, self.down_after)
        else:
            log.warning("backend %s down after %d missed pings; its %d slots go to %s; check "
                        "that host's gateway", b, self.down_after, count, ", ".join(given))

    def _publish_state(self) -> None:
        held = Tally(b.name for b in self._assignment)
        for health in self._health:
            name = health.backend.name
            self.metrics.up.labels(name).set(1 if health.up else 0)
            self.metrics.slots.labels(name).set(held[name])

    async def exposition(self) -> bytes:
        return generate_latest(self.metrics.registry)

    async def readiness(self) -> tuple[bool, str]:
        """Ready while at least one backend answers."""
        up = sorted(self.up)
        return bool(up), f"backends up: {', '.join(up) or 'none'}"

    def _remove(self) -> None:
        if not self._assignment:
            return
        try:
            nft(f"delete table ip {TABLE}\n")
        except BalancerError as e:
            log.error("could not remove the balancer table %s: %s; remove it with "
                      "`nft delete table ip %s`", TABLE, e, TABLE)
            return
        log.info("balancer table %s removed: the VIP no longer balances", TABLE)


# -- the command --------------------------------------------------------------------------
def run_balancer(balancer: Balancer, metrics_bind: str, metrics_port: int | None) -> int:
    """Run `balancer` until SIGTERM or SIGINT, then remove its table; exit 0."""
    from gateway.runtime.logs import setup_logging

    setup_logging("INFO")

    async def main() -> None:
        shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, shutdown.set)
        server = None
        if metrics_port is not None:
            server = MetricsServer(balancer.exposition, balancer.readiness)
            port = await server.start(metrics_bind, metrics_port)
            log.info("balancer metrics on http://%s:%d/metrics", metrics_bind, port)
        try:
            await balancer.run(shutdown)
        finally:
            if server is not None:
                await server.close()

    started = time.monotonic()
    try:
        asyncio.run(main())
    except BalancerError as e:
        log.error("%s", e)
        return 1
    log.info("balancer stopped after %.0f s", time.monotonic() - started)
    return 0
