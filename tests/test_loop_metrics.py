"""The event loop's own counter and histogram expose exactly what prometheus_client's
Counter and Histogram would, for the same increments and observations."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway.runtime.metrics import LATENCY_BUCKETS_S, LoopCounter, LoopHistogram

observations = st.lists(st.floats(min_value=0, max_value=100) | st.sampled_from(
    LATENCY_BUCKETS_S), max_size=50)  # bounds themselves: `le` includes them


@given(observations, st.lists(st.floats(min_value=0, max_value=1e6), max_size=10))
def test_exposition_is_the_same_as_prometheus_clients(values: list[float],
                                                      increments: list[float]) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    histogram = Histogram("x_seconds", "help", buckets=LATENCY_BUCKETS_S, registry=theirs)
    counter = Counter("y", "help", registry=theirs)
    loop_histogram = LoopHistogram("x_seconds", "help", LATENCY_BUCKETS_S, ours)
    loop_counter = LoopCounter("y", "help", ours)
    for v in values:
        histogram.observe(v)
        loop_histogram.observe(v)
    for amount in increments:
        counter.inc(amount)
        loop_counter.inc(amount)

    assert generate_latest(ours) == generate_latest(theirs)
