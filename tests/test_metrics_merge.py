"""gateway.runtime.metrics_merge: the workers' expositions merged into the supervisor's one `/metrics`,
checked on real `Metrics()` registries by parsing the output with prometheus_client's parser
(and `promtool check metrics`)."""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.runtime.metrics import Metrics
from gateway.runtime.metrics_merge import merge

Key = tuple[str, tuple[tuple[str, str], ...]]
NS = "nbiot_gateway"
# The samples merge() must NOT sum, with their rule; written out here, not read from the module.
NOT_SUMMED = {
    f"{NS}_mqtt_connected": min,
    f"{NS}_event_loop_lag_seconds": max,
    f"{NS}_build_info": max,
    "process_start_time_seconds": min,
    "process_max_fds": min,
    "process_open_fds": max,
}
WORKERS_GAUGES = {(f"{NS}_workers", ()), (f"{NS}_workers_up", ())}


def samples(text: bytes) -> dict[Key, float]:
    """Every sample of an exposition by (name, sorted labels); fails on a duplicate series."""
    out: dict[Key, float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def help_and_type(text: bytes) -> dict[str, tuple[str, str]]:
    """Family name -> (HELP, TYPE), as the parser reads them."""
    families = text_string_to_metric_families(text.decode())
    return {f.name: (f.documentation, f.type) for f in families}


def set_value(text: bytes, name: str, value: float) -> bytes:
    """`text` with the unlabelled sample `name` set to `value` (the process collector's values
    are the same for every registry of this test process)."""
    new, n = re.subn(rb"^" + name.encode() + rb" .*$", f"{name} {value!r}".encode(), text,
                     flags=re.MULTILINE)
    assert n == 1, name
    return new


def three_workers() -> list[Metrics]:
    """Three workers driven differently."""
    w0, w1, w2 = Metrics(), Metrics(), Metrics()
    w0.uplinks_received.inc(10)
    w1.uplinks_received.inc(5)
    w2.uplinks_received.inc(1)
    w0.uplinks_accepted.inc(8)
    w1.uplinks_accepted.inc(4)
    w0.uplinks_rejected.labels("bad_token").inc(2)
    w2.uplinks_rejected.labels("bad_token").inc(1)
    w1.uplinks_rejected.labels("schema").inc(3)  # only w1 has seen this reason
    for v in (0.003, 0.02):
        w0.uplink_ack_seconds.observe(v)
    for v in (0.2, 7.0):  # 7 s: only the +Inf bucket
        w1.uplink_ack_seconds.observe(v)
    w2.uplink_ack_seconds.observe(0.0009)
    w0.mqtt_publish_seconds.observe(0.05)
    for w, records, nbytes in ((w0, 5, 500), (w1, 2, 200), (w2, 0, 0)):
        w.spool_records.set(records)
        w.spool_bytes.set(nbytes)
        w.spool_max_bytes.set(1000)
    w0.mqtt_connected.set(1)
    w1.mqtt_connected.set(0)
    w2.mqtt_connected.set(1)
    w0.event_loop_lag_seconds.set(0.01)
    w1.event_loop_lag_seconds.set(0.3)
    w2.event_loop_lag_seconds.set(0.002)
    w0.devices.labels("online").set(3)
    w0.devices.labels("offline").set(1)
    w1.devices.labels("online").set(2)
    w2.devices.labels("never_seen").set(4)
    w0.device_state_changes.labels("offline").inc()
    for w, n in ((w0, 4), (w1, 2), (w2, 4)):
        w.registry_devices.set(n)
    return [w0, w1, w2]


def expositions(workers: list[Metrics]) -> list[bytes]:
    texts = [generate_latest(w.registry) for w in workers]
    for i, text in enumerate(texts):  # distinct per-process values, as N processes have
        text = set_value(text, "process_start_time_seconds", 1_700_000_000.0 + 10 * i)
        text = set_value(text, "process_max_fds", (65536.0, 1024.0, 4096.0)[i])
        text = set_value(text, "process_open_fds", (30.0, 50.0, 20.0)[i])
        text = set_value(text, "process_resident_memory_bytes", 1e8 * (i + 1))
        texts[i] = text
    return texts


@pytest.fixture
def inputs() -> list[bytes]:
    return expositions(three_workers())


def test_everything_not_excepted_is_summed_over_the_workers_that_have_it(
        inputs: list[bytes]) -> None:
    merged = samples(merge(inputs, 3))
    per_worker = [samples(t) for t in inputs]
    keys = {k for s in per_worker for k in s} - WORKERS_GAUGES  # a worker's own: replaced
    assert keys - set(merged) == set()
    assert set(merged) - keys == WORKERS_GAUGES
    for key in keys:
        present = [s[key] for s in per_worker if key in s]
        rule = NOT_SUMMED.get(key[0])
        expected = rule(present) if rule else sum(present)
        assert merged[key] == pytest.approx(expected), key


def test_sums(inputs: list[bytes]) -> None:
    merged = samples(merge(inputs, 3))
    assert merged[(f"{NS}_uplinks_received_total", ())] == 16
    assert merged[(f"{NS}_uplinks_accepted_total", ())] == 12
    assert merged[(f"{NS}_spool_records", ())] == 7
    assert merged[(f"{NS}_spool_bytes", ())] == 700
    assert merged[(f"{NS}_spool_max_bytes", ())] == 3000
    assert merged[(f"{NS}_registry_devices", ())] == 10
    assert merged[(f"{NS}_devices", (("state", "online"),))] == 5
    assert merged[(f"{NS}_devices", (("state", "offline"),))] == 1
    assert merged[(f"{NS}_devices", (("state", "never_seen"),))] == 4
    assert merged[("process_resident_memory_bytes", ())] == 6e8
    cpu = sum(samples(t)[("process_cpu_seconds_total", ())] for t in inputs)
    assert merged[("process_cpu_seconds_total", ())] == pytest.approx(cpu)


def test_exceptions_take_min_or_max(inputs: list[bytes]) -> None:
    merged = samples(merge(inputs, 3))
    assert merged[(f"{NS}_mqtt_connected", ())] == 0  # w1 lost its broker: the alert must fire
    assert merged[(f"{NS}_event_loop_lag_seconds", ())] == 0.3
    version = next(k for k in merged if k[0] == f"{NS}_build_info")
    assert merged[version] == 1
    assert merged[("process_start_time_seconds", ())] == 1_700_000_000.0  # oldest worker
    assert merged[("process_max_fds", ())] == 1024
    assert merged[("process_open_fds", ())] == 50


def test_broker_connected_only_when_every_worker_is() -> None:
    workers = [Metrics(), Metrics()]
    for w in workers:
        w.mqtt_connected.set(1)
    texts = [generate_latest(w.registry) for w in workers]
    assert samples(merge(texts, 2))[(f"{NS}_mqtt_connected", ())] == 1
    workers[1].mqtt_connected.set(0)
    texts = [generate_latest(w.registry) for w in workers]
    assert samples(merge(texts, 2))[(f"{NS}_mqtt_connected", ())] == 0


def test_histograms_buckets_sum_and_count(inputs: list[bytes]) -> None:
    merged = samples(merge(inputs, 3))
    name = f"{NS}_uplink_ack_seconds"
    buckets = {dict(k[1])["le"]: v for k, v in merged.items() if k[0] == f"{name}_bucket"}
    assert buckets == {"0.001": 1, "0.0025": 1, "0.005": 2, "0.01": 2, "0.015": 2, "0.02": 3,
                       "0.025": 3, "0.03": 3, "0.04": 3, "0.05": 3, "0.075": 3, "0.1": 3,
                       "0.25": 4, "0.5": 4, "1.0": 4, "2.5": 4, "5.0": 4, "+Inf": 5}
    ordered = sorted(buckets.items(), key=lambda kv: float(kv[0]))
    assert [v for _, v in ordered] == sorted(buckets.values())  # still cumulative
    assert merged[(f"{name}_count", ())] == 5
    assert merged[(f"{name}_sum", ())] == pytest.approx(0.003 + 0.02 + 0.2 + 7.0 + 0.0009)
    # A histogram only one worker observed: that worker's values, other workers' zeros added.
    assert merged[(f"{NS}_mqtt_publish_seconds_bucket", (("le", "0.05"),))] == 1
    assert merged[(f"{NS}_mqtt_publish_seconds_bucket", (("le", "0.025"),))] == 0
    assert merged[(f"{NS}_mqtt_publish_seconds_count", ())] == 1


def test_label_sets_present_in_only_some_workers(inputs: list[bytes]) -> None:
    merged = samples(merge(inputs, 3))
    rejected = f"{NS}_uplinks_rejected_total"
    assert merged[(rejected, (("reason", "schema"),))] == 3  # w1 only
    assert merged[(rejected, (("reason", "bad_token"),))] == 3  # w0 and w2
    assert [k for k in merged if k[0] == rejected] == [
        (rejected, (("reason", "bad_token"),)), (rejected, (("reason", "schema"),))]
    assert merged[(f"{NS}_device_state_changes_total", (("state", "offline"),))] == 1


def test_workers_gauges(inputs: list[bytes]) -> None:
    text = merge(inputs[:2], 3)  # one worker did not answer
    merged = samples(text)
    assert merged[(f"{NS}_workers", ())] == 3
    assert merged[(f"{NS}_workers_up", ())] == 2
    families = help_and_type(text)
    for name in (f"{NS}_workers", f"{NS}_workers_up"):
        help_text, typ = families[name]
        assert typ == "gauge"
        assert "Worker processes" in help_text
    # Fed back its own output, merge still emits each gauge once (samples() checks that).
    again = samples(merge([text], 5))
    assert again[(f"{NS}_workers", ())] == 5
    assert again[(f"{NS}_workers_up", ())] == 1


def test_no_worker_answered() -> None:
    assert samples(merge([], 2)) == {(f"{NS}_workers", ()): 2, (f"{NS}_workers_up", ()): 0}


def test_help_and_type_kept_each_once_and_no_created_series(inputs: list[bytes]) -> None:
    text = merge(inputs, 3)
    families = help_and_type(text)
    for family, (help_text, typ) in help_and_type(inputs[0]).items():
        assert families[family] == (help_text, typ), family
    assert families[f"{NS}_uplinks_received"][1] == "counter"
    assert families[f"{NS}_uplink_ack_seconds"][1] == "histogram"
    lines = text.decode().splitlines()
    heads = collections.Counter(" ".join(ln.split()[:3]) for ln in lines if ln.startswith("#"))
    assert heads, "no HELP/TYPE lines"
    assert [h for h, n in heads.items() if n > 1] == []
    assert "# TYPE nbiot_gateway_uplinks_received_total counter" in lines
    sample_lines = [ln.rsplit(" ", 1)[0] for ln in lines if ln and not ln.startswith("#")]
    assert len(sample_lines) == len(set(sample_lines))
    assert not [ln for ln in lines if "_created" in ln]


def test_promtool_accepts_the_merged_exposition(inputs: list[bytes]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: run ./scripts/test, which installs Debian's `prometheus`")
    result = subprocess.run([promtool, "check", "metrics"], input=merge(inputs, 3),
                            capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_one_exposition_comes_back_unchanged_plus_the_workers_gauges() -> None:
    worker = three_workers()[0]
    text = generate_latest(worker.registry)
    merged = merge([text], 1)
    assert samples(merged) == {**samples(text), (f"{NS}_workers", ()): 1.0,
                               (f"{NS}_workers_up", ()): 1.0}
    assert {k: v for k, v in help_and_type(merged).items() if not k.startswith(f"{NS}_workers")
            } == {k: v for k, v in help_and_type(text).items() if not k.startswith(f"{NS}_workers")}


def test_an_unparsable_exposition_is_named(inputs: list[bytes]) -> None:
    with pytest.raises(ValueError, match="worker exposition 1"):
        merge([inputs[0], b"nbiot_gateway_x{ 1\n"], 2)


def test_eight_workers_merge_in_a_few_milliseconds(inputs: list[bytes]) -> None:
    eight = (inputs * 3)[:8]
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        merge(eight, 8)
        best = min(best, time.perf_counter() - started)
    assert best < 0.05, f"{best * 1000:.1f} ms"  # ~5 ms here; the bound only catches blunders


def test_created_series_are_dropped() -> None:
    # gateway.runtime.metrics disables them; a worker built without that must not add up start times.
    # This is how generate_latest writes them: a gauge family of their own.
    text = (b"# HELP x_total Things.\n# TYPE x_total counter\nx_total 2.0\n"
            b"# HELP x_created Things.\n# TYPE x_created gauge\nx_created 1.7e+09\n")
    merged = merge([text, text], 2)
    assert samples(merged) == {
        ("x_total", ()): 4.0, (f"{NS}_workers", ()): 2.0, (f"{NS}_workers_up", ()): 2.0}
    assert b"_created" not in merged
