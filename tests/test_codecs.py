"""The payload decoders: any bytes decode or raise DecodeError; RFC 8428 SenML reads as specified."""

from __future__ import annotations

import json
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import load_config
from gateway.pipeline.codecs import CBOR, DECODERS, JSON, SENML_CBOR, SENML_JSON, Decoded, DecodeError, senml
from gateway.pipeline.schema import SchemaViolation, build_schemas
from gateway.timefmt import rfc3339_ms
from tests.conftest import DEFAULT_CONFIG

PROPERTY = settings(max_examples=300, deadline=None)
content_formats = st.sampled_from(sorted(DECODERS))
# Scalars a device might send, including the awkward ones: bignums, inf/nan, bytes.
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(2**1100), 2**1100),
                    st.floats(), st.text(max_size=8), st.binary(max_size=8))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
# SenML records with RFC 8428 labels, text (JSON) and integer (CBOR) ones, and any values.
senml_labels = st.sampled_from(["bver", "bn", "bt", "bu", "bv", "bs", "n", "u", "v", "vs", "vb",
                                "vd", "s", "t", "ut", *senml.CBOR_LABELS])
senml_packs = st.lists(st.dictionaries(senml_labels, scalars, max_size=6), max_size=4)


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, default=lambda b: b.hex()).encode()


payloads = st.one_of(
    st.binary(max_size=80),
    json_values.map(json_bytes),
    json_values.map(cbor2.dumps),
    senml_packs.map(json_bytes),
    senml_packs.map(cbor2.dumps),
    st.dictionaries(st.text(max_size=8), scalars, max_size=5).map(cbor2.dumps),
)


@PROPERTY
@given(content_formats, payloads)
def test_any_payload_decodes_or_raises_decode_error(content_format: int, payload: bytes) -> None:
    try:
        decoded = DECODERS[content_format](payload)
    except DecodeError as e:
        assert e.detail and len(e.detail) <= 96  # goes back to the device as a diagnostic
        return
    assert isinstance(decoded, Decoded)
    assert all(isinstance(name, str) for name in decoded.fields)


numbers = st.one_of(st.integers(), st.integers(-(2**1100), 2**1100), st.floats(),
                    st.floats(0, 1e14), st.booleans(), st.none())
report_keys = st.sampled_from(["seq", "ts", "temperature", "humidity", "voltage", "h2", "other"])
reports = st.one_of(
    st.dictionaries(report_keys, numbers, max_size=4).map(lambda r: (JSON, json_bytes(r))),
    st.dictionaries(report_keys, numbers, max_size=4).map(lambda r: (CBOR, cbor2.dumps(r))),
    st.lists(st.fixed_dictionaries({"n": report_keys, "v": numbers},
                                   optional={"bt": numbers, "t": numbers, "u": st.text(max_size=4)}),
             max_size=4).map(lambda p: (SENML_JSON, json_bytes(p))),
)
SCHEMAS = build_schemas(load_config(DEFAULT_CONFIG).types)


@PROPERTY
@given(st.sampled_from(sorted(SCHEMAS)), reports)
def test_any_decoded_report_validates_to_a_publishable_one_or_raises_schema_violation(
        device_type: str, report: tuple[int, bytes]) -> None:
    content_format, payload = report
    try:
        validated = SCHEMAS[device_type].validate(DECODERS[content_format](payload))
    except (DecodeError, SchemaViolation):
        return
    # What the pipeline then does with it must not fail: format the time, serialize the values.
    if validated.device_time is not None:
        assert rfc3339_ms(validated.device_time).endswith("Z")
    assert json.loads(json.dumps(validated.values, allow_nan=False)) == validated.values


# RFC 8428 5.1.2, in JSON and as the CBOR bytes of RFC 8428 section 6.
RFC8428_JSON = json.dumps([
    {"bn": "urn:dev:ow:10e2073a01080063:", "n": "voltage", "u": "V", "v": 120.1},
    {"n": "current", "u": "A", "v": 1.2},
]).encode()
RFC8428_CBOR = bytes.fromhex(
    "82a421781b" + b"urn:dev:ow:10e2073a0108006:".hex() + "0067" + b"voltage".hex()
    + "016156" + "02fb405e066666666666"
    + "a30067" + b"current".hex() + "016141" + "02f93ccd")


@pytest.mark.parametrize(("content_format", "payload", "current"), [
    (SENML_JSON, RFC8428_JSON, 1.2),
    (SENML_CBOR, RFC8428_CBOR, 1.2001953125),  # the RFC's half-precision float
])
def test_rfc8428_example_decodes_to_fields_and_units(
        content_format: int, payload: bytes, current: float) -> None:
    decoded = DECODERS[content_format](payload)

    assert decoded.fields == {"voltage": 120.1, "current": current}
    assert decoded.units == {"voltage": "V", "current": "A"}


def test_senml_base_time_unit_and_value_apply_to_each_record() -> None:
    pack = [
        {"bn": "urn:dev:imei:3569:", "bt": 1763900000, "bu": "Cel", "bv": 20.0,
         "n": "temperature", "v": 1.5},
        {"n": "humidity", "u": "%RH", "v": 20.25, "t": 10},
    ]

    decoded = DECODERS[SENML_JSON](json.dumps(pack).encode())

    assert decoded.fields == {"temperature": 21.5, "humidity": 40.25, "ts": 1763900000}
    assert decoded.units == {"temperature": "Cel", "humidity": "%RH"}


def test_senml_cbor_integer_labels_read_like_their_json_names() -> None:
    pack = [{-2: "dev1/", -3: 1763900000.0, -4: "ppm", 0: "h2", 2: 12.5},
            {0: "seq", 2: 17}]

    decoded = DECODERS[SENML_CBOR](cbor2.dumps(pack))

    assert decoded.fields == {"h2": 12.5, "seq": 17, "ts": 1763900000.0}
    assert decoded.units == {"h2": "ppm", "seq": "ppm"}


def test_senml_relative_times_set_no_device_time() -> None:
    pack = [{"n": "temperature", "v": 21.0, "t": -5}]

    decoded = DECODERS[SENML_JSON](json.dumps(pack).encode())

    assert decoded.fields == {"temperature": 21.0}


@pytest.mark.parametrize("pack", [
    [],
    {"n": "temperature", "v": 1},
    [{"n": "temperature"}],
    [{"v": 1.0}],
    [{"n": "temperature", "v": 1.0}, {"n": "temperature", "v": 2.0}],
    [{"n": "temperature", "v": "warm"}],
    [{"bn": 7, "n": "temperature", "v": 1.0}],
    [{"bv": 1.0, "n": "temperature", "v": int("9" * 400)}],
    [{"n": "temperature", "v": 1.0, "t": int("9" * 400)}],
    [{"bt": 1.5, "n": "temperature", "v": 1.0, "t": int("9" * 400)}],
    [{"n": "temperature", "v": 1.0, "ver_": 2}],
], ids=["empty", "not-an-array", "no-value", "no-name", "twice", "text-v", "bn-not-text",
        "huge-v-plus-bv", "huge-t", "huge-t-plus-bt", "must-understand"])
@pytest.mark.parametrize("encode", [json.dumps, cbor2.dumps], ids=["json", "cbor"])
def test_senml_pack_that_breaks_rfc8428_raises_decode_error(pack: Any, encode: Any) -> None:
    payload = encode(pack)
    content_format = SENML_JSON if encode is json.dumps else SENML_CBOR
    if isinstance(payload, str):
        payload = payload.encode()

    with pytest.raises(DecodeError):
        DECODERS[content_format](payload)


@pytest.mark.parametrize(("content_format", "payload"), [
    (JSON, b'{"seq": 3, "ts": 1763900000, "temperature": 21.5}'),
    (CBOR, cbor2.dumps({"seq": 3, "ts": 1763900000, "temperature": 21.5})),
])
def test_flat_map_decodes_to_its_fields(content_format: int, payload: bytes) -> None:
    decoded = DECODERS[content_format](payload)

    assert decoded.fields == {"seq": 3, "ts": 1763900000, "temperature": 21.5}


@pytest.mark.parametrize(("content_format", "payload"), [
    (JSON, b"[1, 2]"), (JSON, b'{"a": 1'), (JSON, b"\xff\xfe"), (JSON, b""),
    (CBOR, cbor2.dumps([1, 2])), (CBOR, cbor2.dumps({1: 2})), (CBOR, b"\xa1"), (CBOR, b""),
    (CBOR, cbor2.dumps({"temperature": 1.0}) + b"\x00"),
    (SENML_CBOR, cbor2.dumps([{0: "temperature", 2: 1.0}]) + b"\xa0"),
], ids=["json-array", "json-truncated", "json-not-utf8", "json-empty",
        "cbor-array", "cbor-int-key", "cbor-truncated", "cbor-empty", "cbor-trailing-bytes",
        "senml-cbor-trailing-bytes"])
def test_decoder_rejects_malformed_or_misshaped_payload(
        content_format: int, payload: bytes) -> None:
    with pytest.raises(DecodeError):
        DECODERS[content_format](payload)
