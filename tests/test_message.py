"""The uplink message encoder against its definition (json.dumps of the same dict), and
the cached RFC 3339 formatting against datetime's, over generated inputs."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from gateway.pipeline.message import MessageFormat, reference_encoding
from gateway.pipeline.schema import MAX_DEVICE_TIME_S
from gateway.timefmt import rfc3339_ms

texts = st.text(min_size=1, max_size=20)
names = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
numbers = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                    st.integers(-(2**70), 2**70))
times = st.floats(min_value=0, max_value=MAX_DEVICE_TIME_S, allow_nan=False)


@given(device_id=texts, device_type=texts, tenant=texts, gateway_id=texts,
       seq=st.none() | st.integers(0, 2**63 - 1), received_at=times,
       device_time=st.none() | times, units=st.dictionaries(names, texts, max_size=6),
       data=st.data(), transport=st.sampled_from(["coap", "coaps"]))
def test_encoding_is_byte_identical_to_json_dumps(
        device_id: str, device_type: str, tenant: str, gateway_id: str, seq: int | None,
        received_at: float, device_time: float | None, units: dict[str, str],
        data: st.DataObject, transport: str) -> None:
    values = data.draw(st.fixed_dictionaries({name: numbers for name in units}))
    encoded = MessageFormat(tenant, gateway_id, {device_type: units}).encode(
        device_id, device_type, seq, received_at, device_time, values, transport)
    assert encoded == reference_encoding(device_id, device_type, tenant, gateway_id, seq,
                                         received_at, device_time, values, units, transport)
    assert json.loads(encoded)["readings"] == {n: {"value": v, "unit": units[n]}
                                               for n, v in values.items()}


@given(times | st.floats(min_value=-1e9, max_value=0))
def test_cached_timestamps_match_datetime(epoch_s: float) -> None:
    expected = datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")
    assert rfc3339_ms(epoch_s) == expected[:-6] + "Z"
    assert rfc3339_ms(epoch_s) == expected[:-6] + "Z"  # the second time from the cache


def test_timestamps_at_the_edges_of_a_second() -> None:
    assert rfc3339_ms(1763900000.0) == "2025-11-23T12:13:20.000Z"
    assert rfc3339_ms(1763900000.9999996) == "2025-11-23T12:13:21.000Z"  # rounds up
    assert rfc3339_ms(1763900000.9994) == "2025-11-23T12:13:20.999Z"
