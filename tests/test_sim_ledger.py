"""The simulator's books: what counts as lost, duplicated, unacked or foreign."""

from __future__ import annotations

from gateway.sim.ledger import Ledger
from gateway.sim.payloads import Fault
from gateway.sim.report import Summary, percentiles


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
