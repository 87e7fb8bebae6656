"""The simulator's fast encoders against their references: a device's pre-rendered report
encoder against `payloads.encode`, a request from pre-encoded options against
`wire.encode`, the witness's seq search against a JSON parse."""

from __future__ import annotations

import json
import random

from hypothesis import given
from hypothesis import strategies as st

from gateway.config import load_config
from gateway.ingest.coap import numbers as C
from gateway.ingest.coap import wire
from gateway.pipeline.codecs import CBOR, JSON, SENML_CBOR, SENML_JSON
from gateway.pipeline.message import MessageFormat
from gateway.tools.sim import payloads
from gateway.tools.sim.exchange import encode_request, request_options
from gateway.tools.sim.witness import uplink_key
from tests.conftest import DEFAULT_CONFIG

FIELD = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
READING = st.floats(allow_nan=False, allow_infinity=False, width=64)


@given(st.sampled_from([JSON, CBOR, SENML_JSON, SENML_CBOR]),
       st.dictionaries(FIELD, READING, max_size=5),
       st.dictionaries(FIELD, st.sampled_from(["", "Cel", "%RH", "µg/m³"]), max_size=5),
       st.integers(0, 2**40), st.integers(0, 2**33), st.none() | FIELD)
def test_report_encoder_writes_the_same_bytes_as_encode(
    content_format: int, values: dict[str, float], units: dict[str, str], seq: int, ts: int,
    ack: str | None,
) -> None:
    encoder = payloads.ReportEncoder(content_format, "dev-00001", units)

    fast = [encoder.encode(seq, ts, values, ack) for _ in range(2)]  # parts made, then reused

    assert fast == [payloads.encode(content_format, "dev-00001", seq, ts, values, units, ack)] * 2


@given(st.integers(0, 0xFFFF), st.binary(max_size=8), st.text(min_size=1, max_size=20),
       st.sampled_from([JSON, CBOR, SENML_JSON, SENML_CBOR]), st.binary(max_size=300))
def test_request_from_pre_encoded_options_is_the_whole_message_encoded(
    mid: int, token: bytes, device_token: str, content_format: int, payload: bytes,
) -> None:
    options = request_options("dev-00001", device_token, content_format)

    request = encode_request(mid, token, options, payload)

    message = wire.decode(request)
    assert (message.mtype, message.code, message.mid, message.token, message.payload) == (
        C.CON, C.POST, mid, token, payload)
    assert request == wire.encode(message)


def test_sensor_readings_stay_within_their_types_range() -> None:
    types = load_config(DEFAULT_CONFIG).types
    rng = random.Random(3)
    for kind, spec in types.items():
        sensor = payloads.Sensor(kind, spec, rng, now_s=0.0)
        for step in range(1, 200):
            for name, value in sensor.read(step * 3600.0).items():
                field = spec.fields[name]
                assert field.min is None or value >= field.min, (kind, name, value)
                assert field.max is None or value <= field.max, (kind, name, value)


@given(st.integers(0, 2**53), st.dictionaries(st.sampled_from(["temperature", "humidity"]),
                                               READING, min_size=1))
def test_witness_finds_the_seq_of_every_gateway_uplink_message(
    seq: int, values: dict[str, float],
) -> None:
    units = {"env_th": {"temperature": "Cel", "humidity": "%RH"}}
    message = MessageFormat("plant", "gw1", units).encode(
        "dev-00001", "env_th", seq, 1_763_900_000.5, 1_763_900_000.0, values, "coap")

    key = uplink_key("nbiot/plant/env_th/dev-00001/up", message)

    assert key == ("dev-00001", json.loads(message)["seq"])


def test_witness_skips_an_uplink_without_an_integer_seq() -> None:
    units = {"env_th": {"temperature": "Cel"}}
    message = MessageFormat("plant", "gw1", units).encode(
        "dev-00001", "env_th", None, 1_763_900_000.5, None, {"temperature": 1.0}, "coap")

    assert uplink_key("nbiot/plant/env_th/dev-00001/up", message) is None
