"""The arithmetic behind the fleet bench's and the soak's figures: histogram quantiles from
two scrapes, the load generator's histograms and slot sets, and the soak's trend verdict."""

from __future__ import annotations

import math

import pytest

from gateway.tools.bench.openload import LogHistogram, Schedule, SlotSet
from gateway.tools.bench.probe import bucket_quantile_s
from gateway.tools.bench.soak import Sample, figures, trend


def test_quantile_comes_from_the_buckets_observed_between_two_scrapes() -> None:
    before = {0.001: 100.0, 0.01: 100.0, math.inf: 100.0}  # 100 fast ones before the run
    after = {0.001: 100.0, 0.01: 200.0, math.inf: 200.0}  # the run: 100 in (1 ms, 10 ms]

    assert bucket_quantile_s(before, after, 0.5) == pytest.approx(0.0055)
    assert bucket_quantile_s(before, after, 0.99) == pytest.approx(0.00991)


def test_quantile_past_the_last_bound_is_infinite_and_no_observations_is_zero() -> None:
    after = {0.001: 1.0, math.inf: 10.0}

    assert bucket_quantile_s({}, after, 0.99) == math.inf
    assert bucket_quantile_s(after, after, 0.5) == 0.0


def test_log_histogram_quantile_is_within_its_bucket_width_and_merges() -> None:
    first, second = LogHistogram(), LogHistogram()
    for ms in range(1, 51):
        first.observe(ms / 1000)
    for ms in range(51, 101):
        second.observe(ms / 1000)

    first.merge(LogHistogram.from_json(second.to_json()))

    assert first.total == 100
    assert first.quantile_s(0.5) == pytest.approx(0.050, rel=0.021)
    assert first.max_s() == pytest.approx(0.100, rel=0.021)


def test_slot_set_counts_what_the_witness_lacks() -> None:
    acked, delivered = SlotSet(), SlotSet()
    for slot in (0, 7, 8, 100_000):
        acked.add(slot)
    for slot in (0, 8):
        delivered.add(slot)

    assert len(acked) == 4
    assert acked.missing_from(delivered) == 2
    assert 100_000 in SlotSet.from_json(acked.to_json())


def test_schedule_numbers_slots_round_robin_over_devices() -> None:
    schedule = Schedule(rate_per_s=10, duration_s=3, devices=4, seq_base=1_000_000)

    assert [(schedule.device(k), schedule.seq(k)) for k in (0, 3, 4)] == [
        (0, 1_000_001), (3, 1_000_001), (0, 1_000_002)]
    assert schedule.slot_of(0, 1_000_002) == 4


def test_schedule_with_ids_sends_only_from_the_listed_devices() -> None:
    schedule = Schedule(rate_per_s=10, duration_s=3, devices=3, ids=(7, 2, 40))

    assert [(schedule.device(k), schedule.seq(k)) for k in (0, 1, 2, 3)] == [
        (7, 1), (2, 1), (40, 1), (7, 2)]


def _samples(rss_mb: list[float], step_s: float = 60.0) -> list[Sample]:
    return [Sample(t_s=(i + 1) * step_s, rss_mb=rss, cpu_pct=20.0, open_files=14,
                   spool_records=2.0, write_bytes_per_s=1e6, uplinks_per_s=667.0,
                   cpu_ms_per_uplink=0.3, disk_bytes_per_uplink=1500.0)
            for i, rss in enumerate(rss_mb)]


def test_rss_growing_20_mb_an_hour_fails_the_target_and_flat_figures_pass() -> None:
    samples = _samples([100 + i * 20 / 60 for i in range(120)])  # +20 MB/h for 2 hours
    rss, open_files, spool = (trend(f, samples, warmup_s=600) for f in figures(667.0)[:3])

    assert (rss.verdict, rss.met) == ("growing", False)
    assert rss.slope_per_h == pytest.approx(20.0)
    assert rss.samples == 111  # from 600 s on
    assert (open_files.verdict, open_files.met) == ("flat", True)
    assert (spool.verdict, spool.met) == ("flat", True)


def test_rss_growing_5_mb_an_hour_meets_the_target() -> None:
    rss = trend(figures(667.0)[0], _samples([100 + i * 5 / 60 for i in range(120)]), 600)

    assert (rss.verdict, rss.met) == ("flat", True)


def test_trend_needs_samples_after_the_warm_up() -> None:
    assert trend(figures(667.0)[0], _samples([100.0] * 5), 600).verdict == "too few samples"
