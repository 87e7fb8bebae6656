"""The end of a run in numbers: a Summary built from the merged Ledger and the run's other
figures, as a table for people and as JSON for machines. Formatting, and one judgement:
whether the simulator's own lag distorts the latencies it measured (then the table says
so instead of showing them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.tools.sim.ledger import Ledger
from gateway.tools.sim.payloads import EXPECTED_CODE, Fault

# The simulator's lag adds onto every latency it stamps. Its latencies are called distorted
# when the lag's p99 (fleet or witness) exceeds 50 ms, or 10 % of the lowest p50 reported
# (device-side ack, delivery): past that its own delay is no longer small beside what
# it claims to measure.
LAG_LIMIT_MS = 50.0
LAG_SHARE_OF_P50 = 0.1


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/max by nearest rank, in the values' unit, rounded to 0.1."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)
    n = len(ordered)

    def rank(p: float) -> float:
        return round(ordered[max(0, math.ceil(p / 100 * n) - 1)], 1)

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99), "max": round(ordered[-1], 1)}


def lag_limit_ms(*p50s_ms: float | None) -> float:
    """The lag p99 beyond which latencies with these p50s are distorted."""
    return min([LAG_LIMIT_MS, *(LAG_SHARE_OF_P50 * p for p in p50s_ms if p is not None)])


def _empty() -> dict[str, float | None]:
    return percentiles([])


@dataclass
class Summary:
    devices: int
    profile: str
    seed: int
    duration_s: float
    interval_s: float | None  # None: each device's own report_interval_s
    faulty_devices: int
    sent: int
    transmissions: int
    retransmissions: int
    acked: int
    rejected_by_code: dict[str, int]
    service_unavailable: int
    rate_limited: int
    timeouts: int
    resets: int
    abandoned: int
    nat_rebinds: int
    stale_replies: int
    downlinks_applied: int
    delivered: int
    duplicates_delivered: int
    delivered_unacked: int
    delivered_rejected: int
    foreign_delivered: int
    lost: int
    ack_latency_ms: dict[str, float | None]
    delivery_latency_ms: dict[str, float | None]
    faults_injected: dict[str, int]
    fault_answers: dict[str, dict[str, int]]
    expected_rejected_by_code: dict[str, int]
    dead_letters_by_reason: dict[str, int]
    awake_peak: int
    max_awake: int
    elapsed_s: float
    sent_per_s: float
    sim_cpu_s: float
    sim_peak_rss_mb: float  # the sum of each simulator process's peak
    processes: int = 1  # fleet processes
    fleet_cpu_s: float = 0.0
    witness_cpu_s: float = 0.0
    sim_cpu_per_report_us: float | None = None  # fleet + witness + parent, per report sent
    fleet_lag_ms: dict[str, float | None] = field(default_factory=_empty)
    witness_lag_ms: dict[str, float | None] = field(default_factory=_empty)
    latencies_distorted: bool = field(init=False, default=False)  # judged in __post_init__
    witness_messages: int = 0
    # From the gateway's /metrics, over the run (None: it did not answer).
    gateway_ack_latency_ms: dict[str, float | None] | None = None
    gateway_uplinks: int | None = None
    gateway_cpu_s: float | None = None
    gateway_cpu_per_uplink_us: float | None = None
    notes: list[str] = field(default_factory=list)
    # LwM2M devices (sim.lwm2m_share): their reports are in the figures above too.
    lwm2m_devices: int = 0
    lwm2m_sent: int = 0
    lwm2m_acked: int = 0
    lwm2m_delivered: int = 0
    lwm2m_lost: int = 0
    lwm2m_registers: int = 0
    lwm2m_updates: int = 0
    lwm2m_refused: dict[str, int] = field(default_factory=dict)
    lwm2m_requests: dict[str, int] = field(default_factory=dict)
    lwm2m_interval_writes: int = 0

    def __post_init__(self) -> None:
        lag_p99 = max(self.fleet_lag_ms["p99"] or 0.0, self.witness_lag_ms["p99"] or 0.0)
        limit = lag_limit_ms(self.ack_latency_ms["p50"], self.delivery_latency_ms["p50"])
        self.latencies_distorted = lag_p99 > limit
        if self.latencies_distorted:
            self.notes.append(
                f"the simulator ran late: its event-loop lag p99 was {lag_p99:.0f} ms, over "
                f"{limit:.0f} ms (50 ms or 10 % of the lowest p50), so its ack and delivery "
                "latencies would be its own delay as much as the gateway's; they are left "
                "out of this table (--json keeps them). Simulate fewer devices per process "
                "(--processes), or give the simulator a core of its own")

    @classmethod
    def from_ledger(cls, ledger: Ledger, **run: Any) -> Summary:
        expected: dict[str, int] = {}
        for kind, answers in ledger.fault_answers.items():
            code = EXPECTED_CODE[Fault(kind)]
            expected[code] = expected.get(code, 0) + sum(answers.values())
        return cls(
            sent=ledger.sent,
            transmissions=ledger.transmissions,
            retransmissions=ledger.retransmissions,
            acked=ledger.acked,
            rejected_by_code=dict(sorted(ledger.rejected_by_code.items())),
            service_unavailable=ledger.service_unavailable,
            rate_limited=ledger.rate_limited,
            timeouts=ledger.timeouts,
            resets=ledger.resets,
            abandoned=ledger.abandoned,
            nat_rebinds=ledger.nat_rebinds,
            stale_replies=ledger.stale_replies,
            downlinks_applied=ledger.downlinks_applied,
            delivered=ledger.delivered,
            duplicates_delivered=ledger.duplicates_delivered,
            delivered_unacked=ledger.delivered_unacked,
            delivered_rejected=ledger.delivered_rejected,
            foreign_delivered=ledger.foreign_delivered,
            lost=ledger.lost,
            ack_latency_ms=percentiles(ledger.ack_latency_ms),
            delivery_latency_ms=percentiles(ledger.delivery_latency_ms),
            faults_injected={str(k): v for k, v in sorted(ledger.faults_injected.items())},
            fault_answers={str(k): dict(v) for k, v in sorted(ledger.fault_answers.items())},
            expected_rejected_by_code=dict(sorted(expected.items())),
            dead_letters_by_reason=dict(sorted(ledger.dead_letters_by_reason.items())),
            lwm2m_sent=ledger.lwm2m_sent,
            lwm2m_acked=ledger.lwm2m_acked,
            lwm2m_delivered=ledger.lwm2m_delivered,
            lwm2m_lost=ledger.lwm2m_lost,
            lwm2m_registers=ledger.lwm2m_registers,
            lwm2m_updates=ledger.lwm2m_updates,
            lwm2m_refused=dict(sorted(ledger.lwm2m_refused.items())),
            lwm2m_requests=dict(sorted(ledger.lwm2m_requests.items())),
            lwm2m_interval_writes=ledger.lwm2m_interval_writes,
            **run,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def _latency_rows(self, lat: Callable[[dict[str, float | None]], str]) -> list[tuple[str, str]]:
        distorted = "not shown: the simulator ran late (note below)"
        rows = [
            ("ack latency ms", distorted if self.latencies_distorted else
             lat(self.ack_latency_ms) + "  (at the device: radio both ways, retransmissions)"),
            ("delivery ms", distorted if self.latencies_distorted else
             lat(self.delivery_latency_ms) + "  (first transmission to the witness)"),
        ]
        g = self.gateway_ack_latency_ms
        if g is not None and g["p50"] is not None:
            rows.append(("gateway ack ms", f"p50 {g['p50']:.1f}  p95 {g['p95']:.1f}  p99 {g['p99']:.1f}"
                                           "  (its own histogram: receive to durable 2.04)"))
        f, w = self.fleet_lag_ms, self.witness_lag_ms
        if f["p99"] is not None:
            rows.append(("simulator lag ms", f"fleet p50 {f['p50']:.1f}  p99 {f['p99']:.1f}  max "
                                             f"{f['max']:.0f};  witness p99 {w['p99'] or 0:.1f}  "
                                             f"max {w['max'] or 0:.0f}"))
        return rows

    def _cost_rows(self) -> list[tuple[str, str]]:
        per_report = ("" if self.sim_cpu_per_report_us is None else
                      f", {self.sim_cpu_per_report_us:.0f} µs per report")
        plural = "es" if self.processes > 1 else ""
        rows = [("simulator", f"{self.sim_cpu_s:.1f} s CPU (fleet {self.fleet_cpu_s:.1f} in "
                              f"{self.processes} process{plural}, witness {self.witness_cpu_s:.1f})"
                              f"{per_report}; peak RSS {self.sim_peak_rss_mb:.0f} MB")]
        if self.gateway_cpu_s is not None and self.gateway_cpu_per_uplink_us is not None:
            ratio = ""
            if self.sim_cpu_per_report_us is not None:
                ratio = (f"; simulator/gateway "
                         f"{self.sim_cpu_per_report_us / self.gateway_cpu_per_uplink_us:.2f}")
            rows.append(("gateway", f"{self.gateway_cpu_s:.1f} s CPU for {self.gateway_uplinks} "
                                    f"uplinks, {self.gateway_cpu_per_uplink_us:.0f} µs per uplink"
                                    f"{ratio}"))
        return rows

    def table(self) -> str:
        """The summary for a terminal: one `name  value` row per figure."""
        def lat(d: dict[str, float | None]) -> str:
            if d["p50"] is None:
                return "-"
            return f"p50 {d['p50']:.0f}  p95 {d['p95']:.0f}  p99 {d['p99']:.0f}  max {d['max']:.0f}"

        def counts(d: dict[str, int]) -> str:
            return "  ".join(f"{k}: {v}" for k, v in d.items()) or "-"

        interval = "registry" if self.interval_s is None else f"{self.interval_s:g} s"
        rows = [
            ("devices", f"{self.devices} ({self.faulty_devices} faulty), profile {self.profile}, "
                        f"seed {self.seed}"),
            ("window", f"{self.duration_s:g} s, interval {interval}, run took {self.elapsed_s:.1f} s"),
            ("sent", f"{self.sent} reports ({self.sent_per_s:.0f}/s), {self.transmissions} datagrams"),
            ("retransmissions", f"{self.retransmissions}  (NAT rebinds {self.nat_rebinds})"),
            ("acked (2.04)", str(self.acked)),
            ("rejected", counts(self.rejected_by_code)),
            ("  expected", counts(self.expected_rejected_by_code) + "  (from injected faults)"),
            ("retried later", f"{self.service_unavailable} after 5.03, {self.rate_limited} after 4.29 "
                              f"(each waited Max-Age)"),
            ("no answer", f"{self.timeouts} timed out, {self.abandoned} unfinished at the end, "
                          f"{self.resets} reset"),
            ("delivered (MQTT)", f"{self.delivered}  ({self.delivered_unacked} of them never acked)"),
            ("duplicates", str(self.duplicates_delivered)),
            ("LOST", f"{self.lost}  (acked, never seen on MQTT)"),
            *self._latency_rows(lat),
            ("awake peak", f"{self.awake_peak} devices (cap {self.max_awake})"),
            *self._cost_rows(),
        ]
        if self.lwm2m_devices:
            rows.append(("lwm2m", f"{self.lwm2m_devices} devices: {self.lwm2m_sent} Sends, "
                                  f"{self.lwm2m_acked} acked, {self.lwm2m_delivered} delivered, "
                                  f"lost {self.lwm2m_lost}; {self.lwm2m_registers} Registers, "
                                  f"{self.lwm2m_updates} Updates"))
            if self.lwm2m_requests or self.lwm2m_refused:
                rows.append(("  gateway asked", counts(self.lwm2m_requests) + (
                    f"  (interval writes applied {self.lwm2m_interval_writes})"
                    if self.lwm2m_interval_writes else "")))
            if self.lwm2m_refused:
                rows.append(("  refused", counts(self.lwm2m_refused)))
        if self.downlinks_applied:
            rows.append(("downlinks", f"{self.downlinks_applied} commands applied and confirmed "
                                      "in the next report"))
        if self.delivered_rejected or self.foreign_delivered:
            rows.append(("anomalies", f"delivered though rejected {self.delivered_rejected}, "
                                      f"not sent in this run {self.foreign_delivered}"))
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
