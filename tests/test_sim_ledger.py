"""The simulator's books: what counts as lost, duplicated, unacked or foreign; how the
books of several fleet processes merge; the gateway's own histogram read over a run."""

from __future__ import annotations

from gateway.pipeline.registry import Device
from gateway.tools.sim.gateway_side import GatewayReading, ack_latency_ms
from gateway.tools.sim.ledger import Ledger
from gateway.tools.sim.payloads import Fault
from gateway.tools.sim.report import Summary, percentiles
from gateway.tools.sim.run import split_by_index


def ledger_with(device_id: str = "th-1", first_seq: int = 100) -> Ledger:
    ledger = Ledger()
    ledger.first_seq(device_id, first_seq)
    return ledger


def test_acked_report_never_delivered_counts_as_lost() -> None:
    ledger = ledger_with()
    ledger.report_sent(("th-1", 100), 0.0, None)

    ledger.report_acked(("th-1", 100), 1.0, 0.0)

    assert ledger.lost == 1


def test_delivery_before_the_ack_is_not_lost() -> None:
    ledger = ledger_with()
    ledger.report_sent(("th-1", 100), 0.0, None)

    ledger.report_delivered("th-1", 100, 0.5)
    ledger.report_acked(("th-1", 100), 1.0, 0.0)

    assert ledger.lost == 0
    assert ledger.delivered == 1
    assert ledger.open == {}


def test_second_delivery_of_a_seq_counts_as_duplicate() -> None:
    ledger = ledger_with()
    ledger.report_sent(("th-1", 100), 0.0, None)
    ledger.report_acked(("th-1", 100), 1.0, 0.0)

    ledger.report_delivered("th-1", 100, 2.0)
    ledger.report_delivered("th-1", 100, 3.0)

    assert (ledger.delivered, ledger.duplicates_delivered, ledger.lost) == (1, 1, 0)


def test_delivery_of_a_timed_out_report_counts_as_delivered_unacked() -> None:
    ledger = ledger_with()
    ledger.report_sent(("th-1", 100), 0.0, None)
    ledger.report_given_up(("th-1", 100), "timeout")

    ledger.report_delivered("th-1", 100, 5.0)

    assert (ledger.timeouts, ledger.delivered, ledger.delivered_unacked, ledger.lost) == (1, 1, 1, 0)


def test_delivery_of_a_rejected_report_is_flagged() -> None:
    ledger = ledger_with()
    ledger.report_sent(("th-1", 100), 0.0, Fault.OUT_OF_RANGE)
    ledger.report_rejected(("th-1", 100), "4.00", Fault.OUT_OF_RANGE)

    ledger.report_delivered("th-1", 100, 1.0)

    assert ledger.delivered_rejected == 1
    assert ledger.delivered == 0


def test_messages_not_sent_in_this_run_count_as_foreign() -> None:
    ledger = ledger_with(first_seq=100)

    ledger.report_delivered("th-1", 99, 1.0)
    ledger.report_delivered("th-1", 150, 1.0)
    ledger.report_delivered("other", 100, 1.0)

    assert ledger.foreign_delivered == 3
    assert ledger.delivered == 0


def test_expected_rejections_follow_the_answered_faults() -> None:
    ledger = ledger_with()
    for seq, fault, code in [(100, Fault.MALFORMED, "4.00"), (101, Fault.OUT_OF_RANGE, "4.00"),
                             (102, Fault.OVERSIZED, "4.13")]:
        ledger.report_sent(("th-1", seq), 0.0, fault)
        ledger.report_rejected(("th-1", seq), code, fault)

    summary = Summary.from_ledger(
        ledger, devices=1, profile="faulty", seed=1, duration_s=1, interval_s=1, faulty_devices=1,
        awake_peak=1, max_awake=1, elapsed_s=1, sent_per_s=3, sim_cpu_s=0, sim_peak_rss_mb=0)

    assert summary.expected_rejected_by_code == {"4.00": 2, "4.13": 1}
    assert summary.rejected_by_code == summary.expected_rejected_by_code


def test_percentiles_use_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]

    assert percentiles(values) == {"p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0}
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None, "max": None}


def test_merged_books_add_every_count_and_keep_every_sample() -> None:
    first, second = ledger_with("th-1"), ledger_with("th-2")
    first.report_sent(("th-1", 100), 0.0, None)
    first.report_acked(("th-1", 100), 0.5, 0.0)
    first.report_delivered("th-1", 100, 0.3)
    second.report_sent(("th-2", 100), 0.0, Fault.WRONG_TOKEN)
    second.report_rejected(("th-2", 100), "4.01", Fault.WRONG_TOKEN)
    second.report_sent(("th-2", 101), 1.0, None)
    second.report_acked(("th-2", 101), 2.0, 1.0)
    second.dead_letter("bad_token")
    for ledger in (first, second):
        ledger.seal()

    merged = Ledger()
    merged.merge(first)
    merged.merge(second)

    assert (merged.sent, merged.acked, merged.delivered, merged.lost) == (3, 2, 1, 1)
    assert merged.rejected_by_code == {"4.01": 1}
    assert merged.fault_answers == {Fault.WRONG_TOKEN: {"4.01": 1}}
    assert merged.dead_letters_by_reason == {"bad_token": 1}
    assert sorted(merged.ack_latency_ms) == [500.0, 1000.0]
    assert list(merged.delivery_latency_ms) == [300.0]


def test_devices_are_split_by_index_into_consecutive_shares() -> None:
    rows = [Device(f"d{i}", "env_th", "t", 60) for i in range(10)]

    shares = split_by_index(rows, 3)

    assert [first for first, _ in shares] == [0, 3, 6]
    assert [d for _, share in shares for d in share] == rows


def test_gateway_ack_percentiles_come_from_the_histograms_growth_over_the_run() -> None:
    inf = float("inf")
    before = GatewayReading(10, 1.0, ((0.001, 5), (0.0025, 10), (0.005, 10), (inf, 10)))
    # 100 uplinks in the run: 50 under 1 ms, 40 in (1, 2.5] ms, 10 in (2.5, 5] ms.
    after = GatewayReading(110, 2.0, ((0.001, 55), (0.0025, 100), (0.005, 110), (inf, 110)))

    assert ack_latency_ms(before, after) == {"p50": 1.0, "p95": 3.8, "p99": 4.8}
