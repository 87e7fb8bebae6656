"""LwM2M paths and content formats: spec and reference-implementation byte vectors, round
trips through encode/decode, every refusal with its detail, and fuzzing that arbitrary bytes
only ever raise ContentError."""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Mapping
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.ingest.lwm2m import content
from gateway.ingest.lwm2m.content import (
    CBOR,
    LINK,
    LWM2M_CBOR,
    LWM2M_JSON,
    MAX_CBOR_ENTRIES,
    MAX_PAYLOAD_BYTES,
    MAX_READINGS,
    OPAQUE,
    SENML_CBOR,
    SENML_JSON,
    TEXT,
    TLV,
    TLV_LEGACY,
    ContentError,
    Kind,
    Raw,
    Reading,
    WriteValue,
    as_kind,
    decode,
    encode,
)
from gateway.ingest.lwm2m.paths import LwM2mPath, PathError, check_path, is_under, parse_path, render_path

NOW = 1_750_000_000.0
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def values_of(readings: list[Reading]) -> dict[LwM2mPath, Any]:
    return {r.path: r.value for r in readings}


def error_of(payload: bytes, content_format: int, base: LwM2mPath = (3, 0)) -> str:
    with pytest.raises(ContentError) as caught:
        decode(payload, content_format, base, NOW)
    return caught.value.detail


# -- paths ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "path"), [
    ("/", ()), ("/3303", (3303,)), ("/3303/0", (3303, 0)), ("/3303/0/5700", (3303, 0, 5700)),
    ("/3/0/7/1", (3, 0, 7, 1)), ("/65535/65535/65535/65535", (65535,) * 4),
])
def test_a_path_parses_to_ints_and_renders_back(text: str, path: LwM2mPath) -> None:
    assert parse_path(text) == path
    assert render_path(path) == text


@pytest.mark.parametrize(("text", "detail"), [
    ("", "not an LwM2M path: ''"),
    ("3/0", "not an LwM2M path: '3/0'"),
    ("/3/0/", "not an LwM2M path: '/3/0/'"),
    ("//3", "not an LwM2M path: '//3'"),
    ("/3/-1", "not an LwM2M path: '/3/-1'"),
    ("/3/x", "not an LwM2M path: '/3/x'"),
    ("/3/\u0663", "not an LwM2M path: '/3/\u0663'"),  # an Arabic-Indic digit: isdigit() but not ASCII
    ("/3/0/7/1/2", "/3/0/7/1/2 has 5 levels, an LwM2M path at most 4"),
    ("/65536", "id 65536 in /65536 is over 65535"),
    ("/1" + "0" * 5000, "id 100000000000 in /100000000000000000000000000000000000000 is over 65535"),
])
def test_anything_else_is_a_path_error_with_a_detail(text: str, detail: str) -> None:
    with pytest.raises(PathError) as caught:
        parse_path(text)
    assert caught.value.detail == detail


def test_leading_zeros_are_read_as_decimal() -> None:
    assert parse_path("/0003/" + "0" * 5000 + "1") == (3, 1)


@pytest.mark.parametrize(("path", "detail"), [
    ((1, 2, 3, 4, 5), "an LwM2M path has at most 4 levels, not 5"),
    ((3, 65536), "the id at level 2 is not an integer in 0..65535"),
    ((3, -1), "the id at level 2 is not an integer in 0..65535"),
    ((True,), "the id at level 1 is not an integer in 0..65535"),
])
def test_check_path_refuses_a_tuple_that_is_no_path(path: tuple[Any, ...], detail: str) -> None:
    with pytest.raises(PathError) as caught:
        check_path(path)
    assert caught.value.detail == detail


def test_is_under_counts_the_node_itself() -> None:
    assert is_under((3, 0, 1), (3, 0)) and is_under((3, 0), (3, 0)) and is_under((3,), ())
    assert not is_under((3, 1, 0), (3, 0)) and not is_under((3,), (3, 0))


# -- TLV: the examples of TS Core 1.0 §6.4.3.x, as Leshan's LwM2mNodeDecoderTest holds them
# (eclipse-leshan/leshan leshan-lwm2m-core/src/test/java/.../codec/LwM2mNodeDecoderTest.java)
DEVICE_RESOURCES_TLV = bytes.fromhex(
    "C800144F70656E204D6F62696C6520416C6C69616E6365C801164c69676874776569676874204d324d20436c69656e74"
    "C80209333435303030313233C303312E30860641000141010588070842000ED842011388870841007D42010384C10964"
    "C10A0F830B410000C40D5182428FC60E2B30323A3030C11055")
DEVICE_INSTANCE_TLV = bytes.fromhex(
    "080079C800144F70656E204D6F62696C6520416C6C69616E6365C801164C69676874776569676874204D324D20436C69"
    "656E74C80209333435303030313233C303312E30860641000141010588070842000ED842011388870841007D42010384"
    "C10964C10A0F830B410000C40D5182428FC60E2B30323A3030C11055")
ACL_TLV = bytes.fromhex("08000EC10001C101008302417F07C1037F080212C10003C101008702417F0761013601C1037F")
SERVER_TLV = bytes.fromhex("08000FC10001C40100015180C10601C10755")
OBJ65_TLV = bytes.fromhex("88000C440000420000440100420001C8010D38363133383030373535353030C40212345678")
OBJ66_TLV = bytes.fromhex(
    "080026C8000B6D79536572766963652031C8010F496E7465726E65742E31352E323334C40200430000080126C8000B6D"
    "79536572766963652032C8010F496E7465726E65742E31352E323335C402FFFFFFFF")

DEVICE_KINDS: dict[int, Kind] = {0: "string", 1: "string", 2: "string", 3: "string", 6: "integer",
                                 7: "integer", 8: "integer", 9: "integer", 10: "integer",
                                 11: "integer", 13: "integer", 14: "string", 16: "string"}
DEVICE_VALUES: dict[LwM2mPath, WriteValue] = {
    (3, 0, 0): "Open Mobile Alliance", (3, 0, 1): "Lightweight M2M Client", (3, 0, 2): "345000123",
    (3, 0, 3): "1.0", (3, 0, 6, 0): 1, (3, 0, 6, 1): 5, (3, 0, 7, 0): 3800, (3, 0, 7, 1): 5000,
    (3, 0, 8, 0): 125, (3, 0, 8, 1): 900, (3, 0, 9): 100, (3, 0, 10): 15, (3, 0, 11, 0): 0,
    (3, 0, 13): 1367491215, (3, 0, 14): "+02:00", (3, 0, 16): "U",
}


def typed(readings: list[Reading], kinds: Mapping[int, Kind]) -> dict[LwM2mPath, Any]:
    return {r.path: as_kind(r.value, kinds[r.path[2]]) for r in readings}


@pytest.mark.parametrize("payload", [DEVICE_RESOURCES_TLV, DEVICE_INSTANCE_TLV],
                         ids=["resources", "instance"])
def test_tlv_device_instance_from_the_spec(payload: bytes) -> None:
    readings = decode(payload, TLV, (3, 0), NOW)

    assert all(isinstance(r.value, Raw) and r.time is None for r in readings)
    assert typed(readings, DEVICE_KINDS) == DEVICE_VALUES


def test_tlv_acl_object_with_two_instances_from_the_spec() -> None:
    readings = decode(ACL_TLV, TLV, (2,), NOW)

    assert {r.path: as_kind(r.value, "integer") for r in readings} == {
        (2, 0, 0): 1, (2, 0, 1): 0, (2, 0, 2, 127): 7, (2, 0, 3): 127,
        (2, 2, 0): 3, (2, 2, 1): 0, (2, 2, 2, 127): 7, (2, 2, 2, 310): 1, (2, 2, 3): 127,
    }


def test_tlv_server_object_from_the_spec() -> None:
    readings = decode(SERVER_TLV, TLV, (1,), NOW)

    kinds: dict[int, Kind] = {0: "integer", 1: "integer", 6: "boolean", 7: "string"}
    assert typed(readings, kinds) == {(1, 0, 0): 1, (1, 0, 1): 86400, (1, 0, 6): True, (1, 0, 7): "U"}


def test_tlv_object_links_from_the_spec() -> None:
    obj65 = values_of(decode(OBJ65_TLV, TLV, (65, 0), NOW))
    obj66 = values_of(decode(OBJ66_TLV, TLV, (66,), NOW))

    # Objlnk is two 16-bit ids; as_kind has no such kind, the bytes are what the wire says
    assert obj65 == {(65, 0, 0, 0): b"\x00\x42\x00\x00", (65, 0, 0, 1): b"\x00\x42\x00\x01",
                     (65, 0, 1): b"8613800755500", (65, 0, 2): b"\x12\x34\x56\x78"}
    assert as_kind(obj65[65, 0, 2], "integer") == 305419896
    assert as_kind(obj66[66, 0, 0], "string") == "myService 1"
    assert as_kind(obj66[66, 1, 2], "integer") == -1
    assert sorted(obj66) == [(66, 0, 0), (66, 0, 1), (66, 0, 2), (66, 1, 0), (66, 1, 1), (66, 1, 2)]


def test_tlv_resource_instances_with_or_without_their_multiple_resource() -> None:
    # Leshan's tlv_power_source__array_values and tlv_power_source__multiple_resource
    bare = decode(bytes([65, 0, 1, 65, 1, 5]), TLV, (3, 0, 6), NOW)
    wrapped = decode(bytes([0x86, 6, 65, 0, 1, 65, 1, 5]), TLV, (3, 0, 6), NOW)

    assert values_of(bare) == values_of(wrapped) == {(3, 0, 6, 0): b"\x01", (3, 0, 6, 1): b"\x05"}


def test_tlv_object_instance_around_the_requested_resource_is_unwrapped() -> None:
    # Leshan's tlv_resource_with_undesired_object_instance: /3/0/1 answered inside instance 0
    payload = bytes([0x08, 0x00, 0x08, 0xC6, 0x01]) + b"client"

    assert values_of(decode(payload, TLV, (3, 0, 1), NOW)) == {(3, 0, 1): b"client"}
    assert error_of(bytes([0x08, 0x01, 0x08, 0xC6, 0x01]) + b"client", TLV, (3, 0, 1)) == (
        "TLV object instance 1 in the answer to a request on /3/0/1")


def test_tlv_reads_all_four_length_encodings_and_16_bit_ids() -> None:
    short = bytes([0xC3, 0x01]) + b"abc"  # length in the type byte
    one = bytes([0xC8, 0x02, 0x08]) + b"x" * 8  # 8-bit length
    two = bytes([0xD0, 0x03, 0x01, 0x00]) + b"y" * 256  # 16-bit length
    three = bytes([0xD8, 0x04, 0x01, 0x00, 0x00]) + b"z" * 65536  # 24-bit length
    wide_id = bytes([0xE1, 0x13, 0x88, 0x2A])  # 16-bit identifier 5000
    payload = short + one + two + wide_id

    assert values_of(decode(payload, TLV, (3303, 0), NOW)) == {
        (3303, 0, 1): b"abc", (3303, 0, 2): b"x" * 8, (3303, 0, 3): b"y" * 256, (3303, 0, 5000): b"\x2a"}
    # 24-bit lengths are read; the whole payload stays under the 64 KiB cap only below 65531 bytes
    three_small = bytes([0xD8, 0x04, 0x00, 0x00, 0x05]) + b"zzzzz"
    assert values_of(decode(three_small, TLV, (3303, 0), NOW)) == {(3303, 0, 4): b"zzzzz"}
    assert error_of(three, TLV, (3303, 0)) == "payload of 65541 bytes is over the 65536-byte limit"


def test_tlv_empty_payloads_are_no_readings() -> None:
    assert decode(b"", TLV, (2,), NOW) == []
    assert decode(b"", TLV, (2, 0), NOW) == []
    assert decode(bytes([0x80, 6]), TLV, (3, 0, 6), NOW) == []


def test_the_legacy_tlv_number_is_accepted() -> None:
    assert decode(SERVER_TLV, TLV_LEGACY, (1,), NOW) == decode(SERVER_TLV, TLV, (1,), NOW)


@pytest.mark.parametrize(("payload", "base", "detail"), [
    (bytes([0xC3, 0x01, 0x61]), (3, 0), "TLV length runs past the payload at byte 0"),
    (bytes([0xC1, 0x00, 0x01, 0xC8, 0x05, 0x09, 0x00]), (3, 0), "TLV length runs past the payload at byte 3"),
    (bytes([0xC8]), (3, 0), "TLV header runs past the payload at byte 0"),
    (bytes([0xE8, 0x01]), (3, 0), "TLV header runs past the payload at byte 0"),
    (bytes([0x08, 0x00, 0x03, 0xC3, 0x01, 0x61]), (3,), "TLV length runs past its enclosing TLV at byte 3"),
    (bytes([0x08, 0x00, 0x03, 0x41, 0x00, 0x07]), (3,),
     "a TLV resource instance inside object instance /3/0 at byte 3"),
    (bytes([0x82, 0x06, 0xC0, 0x00]), (3, 0), "a TLV resource inside multiple resource /3/0/6 at byte 2"),
    (bytes([0x08, 0x01, 0x00]), (3, 0, 1, 0), "TLV object instance 1 in the answer to a request on /3/0/1/0"),
    (bytes([0x80, 0x06, 0x80, 0x06]), (3, 0), "/3/0/6 appears twice"),
    (bytes([0x41, 0x00, 0x01]), (3, 0), "a TLV resource instance cannot answer a request on /3/0"),
    (bytes([0xC1, 0x00, 0x01]), (3,), "a TLV resource cannot answer a request on /3"),
    (bytes([0xC1, 0x00, 0x01]), (), "TLV answers a request on an object, instance or resource, not /"),
    (bytes([0xC1, 0x01, 0x01, 0xC1, 0x01, 0x02]), (3, 0), "/3/0/1 appears twice"),
    (bytes([0x00, 0x01, 0x00, 0x01]), (3,), "/3/1 appears twice"),  # Leshan: 2 instances, same id
    (bytes([0x08, 0x00, 0x06, 0xC1, 0x00, 0x01, 0xC1, 0x01, 0x02]), (3, 0, 1),
     "/3/0/0 is outside the requested /3/0/1"),
])
def test_tlv_refusals_say_where(payload: bytes, base: LwM2mPath, detail: str) -> None:
    assert error_of(payload, TLV, base) == detail


def test_tlv_more_than_1000_values_is_refused() -> None:
    payload = b"".join(bytes([0xE1]) + rid.to_bytes(2, "big") + b"\x00" for rid in range(MAX_READINGS + 1))

    assert len(decode(payload[: 4 * MAX_READINGS], TLV, (3303, 0), NOW)) == MAX_READINGS
    assert error_of(payload, TLV, (3303, 0)) == "more than 1000 values in one payload"


# -- as_kind -------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "kind", "value"), [
    (b"\x7f", "integer", 127), (b"\x80", "integer", -128), (b"\x0e\xd8", "integer", 3800),
    (b"\xff\xff\xff\xff", "integer", -1), (b"\x00\x00\x00\x00\x00\x00\x00\x01", "integer", 1),
    (struct.pack(">f", 21.5), "float", 21.5), (struct.pack(">d", 0.1), "float", 0.1),
    (b"\x01", "boolean", True), (b"\x00", "boolean", False),
    ("é".encode(), "string", "é"), (b"", "string", ""), (b"\x00\xff", "opaque", b"\x00\xff"),
])
def test_raw_tlv_bytes_read_as_the_resource_type(raw: bytes, kind: Kind, value: object) -> None:
    converted = as_kind(Raw(raw), kind)

    assert converted == value and type(converted) is type(value)


@pytest.mark.parametrize(("raw", "kind", "detail"), [
    (b"\x00\x00\x00", "integer", "a TLV integer is 1, 2, 4 or 8 bytes, not 3"),
    (b"", "integer", "a TLV integer is 1, 2, 4 or 8 bytes, not 0"),
    (b"\x00\x00", "float", "a TLV float is 4 or 8 bytes, not 2"),
    (b"\x02", "boolean", "a TLV boolean is one byte, 0 or 1"),
    (b"\x00\x01", "boolean", "a TLV boolean is one byte, 0 or 1"),
    (b"a\xff", "string", "a TLV string is not UTF-8 at byte 1"),
])
def test_raw_tlv_bytes_that_do_not_fit_the_type_are_refused(raw: bytes, kind: Kind, detail: str) -> None:
    with pytest.raises(ContentError) as caught:
        as_kind(Raw(raw), kind)
    assert caught.value.detail == detail


@pytest.mark.parametrize(("value", "kind", "converted"), [
    ("21.5", "float", 21.5), ("-3", "float", -3.0), ("1e+16", "float", 1e16), (".5", "float", 0.5),
    ("42", "integer", 42), ("-42", "integer", -42), ("+7", "integer", 7),
    ("1", "boolean", True), ("0", "boolean", False), ("Cel", "string", "Cel"),
    ("AQIDBAU=", "opaque", b"\x01\x02\x03\x04\x05"),  # Leshan's text_decode_opaque_from_base64_string
    (22, "float", 22.0), (22.0, "integer", 22), (22, "integer", 22), (2.5, "float", 2.5),
    (True, "boolean", True), (b"\x01", "opaque", b"\x01"),
])
def test_text_and_typed_values_convert_without_loss(value: Any, kind: Kind, converted: object) -> None:
    result = as_kind(value, kind)

    assert result == converted and type(result) is type(converted)


@pytest.mark.parametrize(("value", "kind", "detail"), [
    ("21.5", "integer", "'21.5' is not an integer"),
    (" 42", "integer", "' 42' is not an integer"),
    ("1_000", "integer", "'1_000' is not an integer"),
    ("9" * 25, "integer", "'99999999999999999999' is not an integer"),
    ("99999999999999999999", "integer", "text: integer out of the 64-bit range"),
    ("nan", "float", "'nan' is not a float"),
    ("1e9999", "float", "'1e9999' is not a float"),
    ("true", "boolean", "'true' is not a boolean (0 or 1)"),
    ("!,-INVALID$_'", "opaque", "text/plain opaque is not valid base64"),  # Leshan's invalid base64
    (2.5, "integer", "a float value is not an integer"),
    (1, "boolean", "a int value is not a boolean"),
    (True, "integer", "a bool value is not an integer"),
    (b"\x01", "string", "a bytes value is not a string"),
    (3.0, "string", "a float value is not a string"),
])
def test_values_that_do_not_fit_the_type_are_refused(value: Any, kind: Kind, detail: str) -> None:
    with pytest.raises(ContentError) as caught:
        as_kind(value, kind)
    assert caught.value.detail == detail


def test_an_unknown_kind_is_a_programming_error_not_a_content_error() -> None:
    with pytest.raises(ValueError, match="unknown LwM2M data type") as caught:
        as_kind(Raw(b"\x01"), "time")  # type: ignore[arg-type]
    assert not isinstance(caught.value, ContentError)


# -- text, opaque, plain CBOR --------------------------------------------------------------
def test_text_is_one_string_at_the_request_path() -> None:
    # Leshan's text_battery_resource: "100" read on /3/0/9 stays text until the type is known
    assert decode(b"100", TEXT, (3, 0, 9), NOW) == [Reading((3, 0, 9), "100", None)]
    assert decode(b"", TEXT, (3, 0, 14), NOW) == [Reading((3, 0, 14), "", None)]
    assert decode("é".encode(), TEXT, (3, 0, 7, 1), NOW) == [Reading((3, 0, 7, 1), "é", None)]


def test_opaque_is_bytes_at_the_request_path() -> None:
    [reading] = decode(b"\x00\xfe", OPAQUE, (5, 0, 0), NOW)

    assert reading == Reading((5, 0, 0), b"\x00\xfe", None) and not isinstance(reading.value, Raw)


def test_plain_cbor_is_one_typed_value() -> None:
    assert decode(cbor2.dumps(21.5), CBOR, (3303, 0, 5700), NOW) == [Reading((3303, 0, 5700), 21.5)]
    assert decode(bytes.fromhex("C11A514B67B0"), CBOR, (3, 0, 13), NOW) == [Reading((3, 0, 13), 1363896240)]
    assert decode(bytes.fromhex("C482201832"), CBOR, (3303, 0, 5700), NOW) == [Reading((3303, 0, 5700), 5.0)]


@pytest.mark.parametrize(("payload", "content_format", "base", "detail"), [
    (b"21", TEXT, (3, 0), "text/plain carries one resource value; /3/0 is not a resource"),
    (b"a\xffb", TEXT, (3, 0, 1), "text/plain is not UTF-8 at byte 1"),
    (b"x", OPAQUE, (5,), "opaque carries one resource value; /5 is not a resource"),
    (b"\xf6", CBOR, (3, 0, 1), "CBOR: null value at /3/0/1"),
    (b"\x80", CBOR, (3, 0, 1), "CBOR: a list is no LwM2M value (at /3/0/1)"),
    (b"\x01\x02", CBOR, (3, 0, 1), "invalid CBOR: 1 bytes after the data item"),
    (b"\x3b\xff\xff\xff\xff\xff\xff\xff\xff", CBOR, (3, 0, 1), "CBOR: integer out of the 64-bit range"),
    (b"\xc3\x49\x01" + bytes(8), CBOR, (3, 0, 1), "CBOR: integer out of the 64-bit range"),
    (b"x", LINK, (3, 0), "link-format (40) carries links, not values"),
    (b"{}", LWM2M_JSON, (3, 0), "OMA LwM2M JSON (11543) is not decoded: ask for SenML JSON (110)"),
    (b"x", 50, (3, 0), "content format 50 is not decoded"),
    (b"x", TEXT, (3, 70000, 1), "request path: the id at level 2 is not an integer in 0..65535"),
    (b"x" * (MAX_PAYLOAD_BYTES + 1), OPAQUE, (5, 0, 0),
     "payload of 65537 bytes is over the 65536-byte limit"),
])
def test_single_value_refusals(payload: bytes, content_format: int, base: LwM2mPath, detail: str) -> None:
    assert error_of(payload, content_format, base) == detail


# -- LwM2M CBOR: Anjay Lite's tests/anj/io/lwm2m_cbor_in.c (AVSystem), TS Core 1.1.1 §7.4.6 --
@pytest.mark.parametrize("payload", [
    "A1830D181A01182A",  # {[13, 26, 1]: 42}
    "BF9F0D181A01FF182AFF",  # the same, indefinite lengths
    "A10DA1181AA101182A",  # {13: {26: {1: 42}}}
    "BF0DBF181ABF01182AFFFFFF",  # the same, indefinite lengths
    "A1810DA181181AA18101182A",  # {[13]: {[26]: {[1]: 42}}}
])
def test_lwm2m_cbor_single_resource_in_every_shape(payload: str) -> None:
    assert decode(bytes.fromhex(payload), LWM2M_CBOR, (13, 26, 1), NOW) == [Reading((13, 26, 1), 42, None)]


@pytest.mark.parametrize("payload", [
    "A1820D181AA201182A0215",  # {[13, 26]: {1: 42, 2: 21}}
    "A2830D181A01182A830D181A0215",  # {[13, 26, 1]: 42, [13, 26, 2]: 21}
    "A2820D181AA101182A830D181A0215",  # {[13, 26]: {1: 42}, [13, 26, 2]: 21}
    "A2830D181A01182A820D181AA1810215",  # {[13, 26, 1]: 42, [13, 26]: {[2]: 21}}
])
def test_lwm2m_cbor_two_resources_with_mixed_prefixes(payload: str) -> None:
    readings = decode(bytes.fromhex(payload), LWM2M_CBOR, (13, 26), NOW)

    assert values_of(readings) == {(13, 26, 1): 42, (13, 26, 2): 21}


def test_lwm2m_cbor_typed_values() -> None:
    decimal = bytes.fromhex("A1810DA181181AA18101A18102C482201832")  # {[13]:{[26]:{[1]:{[2]: 4([-1, 50])}}}}
    values = {"A1830D181A01" + "50" + "00112233445566778899AABBCCDDEEFF": b"\x00\x11\x22\x33\x44\x55\x66\x77"
              b"\x88\x99\xaa\xbb\xcc\xdd\xee\xff",
              "A1830D181A01" + "5F48001122334455667748" + "8899AABBCCDDEEFF" + "FF": bytes.fromhex(
                  "00112233445566778899AABBCCDDEEFF"),
              "A1830D181A01" + "70" + b"c--cossiezepsulo".hex(): "c--cossiezepsulo",
              "A1830D181A01F5": True,
              "A1830D181A01FB4035000000000000": 21.0,
              "A1830D181A01C11A514B67B0": 1363896240}

    assert decode(decimal, LWM2M_CBOR, (), NOW) == [Reading((13, 26, 1, 2), 5.0)]
    for payload, value in values.items():
        [reading] = decode(bytes.fromhex(payload), LWM2M_CBOR, (13,), NOW)
        assert reading.value == value and type(reading.value) is type(value)


@pytest.mark.parametrize(("payload", "base", "detail"), [
    ("A1830D181A01A202F60305", (13, 26, 1), "LwM2M CBOR: null value at /13/26/1/2"),  # Anjay's null_and_int
    ("81182A", (), "LwM2M CBOR: expected a map of path -> value"),
    ("A280182A0115", (), "LwM2M CBOR: an empty array as a key"),
    ("A1613301", (), "LwM2M CBOR: a key is an id (0..65535) or an array of ids"),
    ("A1821A000100000101", (), "LwM2M CBOR: a key is an id (0..65535) or an array of ids"),
    ("A1F501", (), "LwM2M CBOR: a key is an id (0..65535) or an array of ids"),
    ("A1850102030405182A", (), "LwM2M CBOR: a path deeper than 4 levels under /"),
    ("A183010203A10AA1181A182A", (), "LwM2M CBOR: a path deeper than 4 levels under /1/2/3/10"),
    ("A1820D181A182A", (), "LwM2M CBOR: a value at /13/26, which is no resource"),
    ("A2830D181A01182A0DA1181AA10115", (), "/13/26/1 appears twice"),
    ("A1830D181A0181F5", (), "LwM2M CBOR: a list is no LwM2M value (at /13/26/1)"),
    ("A1830D181A01D90FA0F5", (), "LwM2M CBOR: a CBORTag is no LwM2M value (at /13/26/1)"),
    ("A1830D181A01F7", (), "LwM2M CBOR: a UndefinedType is no LwM2M value (at /13/26/1)"),
    ("A1830D181A01D8641901F4", (), "LwM2M CBOR: a date is no LwM2M value (at /13/26/1)"),
    ("A1830D181A01182A", (3,), "/13/26/1 is outside the requested /3"),
    ("A1830D181A01", (), "invalid LwM2M CBOR: CBORDecodeEOF"),
])
def test_lwm2m_cbor_refusals(payload: str, base: LwM2mPath, detail: str) -> None:
    assert error_of(bytes.fromhex(payload), LWM2M_CBOR, base) == detail


def test_lwm2m_cbor_shared_references_cannot_multiply_the_work() -> None:
    # tag 28 marks a map shareable, tag 29 refers back to it: 100 keys naming one map of 100
    # empty maps is 10,100 entries to visit from 800-odd bytes
    inner = b"\xd8\x1c\xb8\x64" + b"".join(cbor2.dumps(i) + b"\xa0" for i in range(100))
    refs = b"".join(cbor2.dumps(i) + b"\xd8\x1d\x00" for i in range(1, 100))
    outer = b"\xb8\x64" + cbor2.dumps(0) + inner + refs

    assert error_of(outer, LWM2M_CBOR, ()) == f"LwM2M CBOR: more than {MAX_CBOR_ENTRIES} map entries"


def test_lwm2m_cbor_a_map_that_contains_itself_ends_at_four_levels() -> None:
    loop = bytes.fromhex("D81CA100D81D00")  # {0: <itself>}

    assert error_of(loop, LWM2M_CBOR, ()) == "LwM2M CBOR: a path deeper than 4 levels under /0/0/0/0"


# -- SenML JSON ----------------------------------------------------------------------------
# TS Core 1.1 Table 7.4.4-2 (Read /3/0 in SenML JSON), as Wakaama's tests/senml_json_tests.c holds it
DEVICE_SENML_JSON = (
    b'[{"bn":"/3/0/","n":"0","vs":"Open Mobile Alliance"},{"n":"1","vs":"Lightweight M2M Client"},'
    b'{"n":"2","vs":"345000123"},{"n":"3","vs":"1.0"},{"n":"6/0","v":1},{"n":"6/1","v":5},'
    b'{"n":"7/0","v":3800},{"n":"7/1","v":5000},{"n":"8/0","v":125},{"n":"8/1","v":900},'
    b'{"n":"9","v":100},{"n":"10","v":15},{"n":"11/0","v":0},{"n":"13","v":1367491215},'
    b'{"n":"14","vs":"+02:00"},{"n":"16","vs":"U"}]')


def test_senml_json_device_instance_from_the_spec() -> None:
    readings = decode(DEVICE_SENML_JSON, SENML_JSON, (3, 0), NOW)

    assert values_of(readings) == DEVICE_VALUES
    assert all(r.time is None for r in readings)
    assert [type(r.value) for r in readings[:5]] == [str, str, str, str, int]


def test_senml_names_resolve_against_bn_then_the_request_path() -> None:
    payload = json.dumps([
        {"n": "0/5700", "v": 21.5},  # relative, no bn: below the request path
        {"n": "/3303/1/5700", "v": 22.5},  # absolute
        {"bn": "/3303/2/", "n": "5700", "v": 23.5},
        {"n": "5701", "vs": "Cel"},  # bn carries on
        {"bn": "/3303/3/5700", "v": 24.5},  # bn alone names the resource
        {"bn": "4/", "n": "5700", "v": 25.5},  # a relative bn is below the request path too
    ]).encode()

    assert values_of(decode(payload, SENML_JSON, (3303,), NOW)) == {
        (3303, 0, 5700): 21.5, (3303, 1, 5700): 22.5, (3303, 2, 5700): 23.5, (3303, 2, 5701): "Cel",
        (3303, 3, 5700): 24.5, (3303, 4, 5700): 25.5}


def test_senml_record_without_a_name_is_the_request_path() -> None:
    assert decode(b'[{"v":21.5}]', SENML_JSON, (3303, 0, 5700), NOW) == [Reading((3303, 0, 5700), 21.5)]


def test_senml_times_follow_rfc_8428() -> None:
    # Leshan's json_timestamped_resources, in SenML: bt plus each t; a small bt is relative to now
    payload = (b'[{"bn":"/1024/0/1","bt":25462634,"v":22.9,"t":-30},{"v":22.4,"t":-5},'
               b'{"v":24.1,"t":-50},{"bt":1700000000,"v":1},{"t":5,"v":2},{"bt":0,"t":-60,"v":3}]')

    readings = decode(payload, SENML_JSON, (1024, 0, 1), NOW)

    assert [(r.value, r.time) for r in readings] == [
        (22.9, NOW + 25462634 - 30), (22.4, NOW + 25462634 - 5), (24.1, NOW + 25462634 - 50),
        (1, 1700000000.0), (2, 1700000005.0), (3, NOW - 60)]
    assert all(r.path == (1024, 0, 1) for r in readings)  # one resource at several times is fine


def test_senml_a_record_with_no_time_has_none_and_t_alone_is_relative() -> None:
    readings = decode(b'[{"n":"/3/0/9","v":100},{"n":"/3/0/10","v":15,"t":-10}]', SENML_JSON, (), NOW)

    assert [r.time for r in readings] == [None, NOW - 10]


def test_senml_value_kinds() -> None:
    payload = (b'[{"bn":"/65/0/","n":"0/0","vlo":"66:0"},{"n":"1","vb":true},{"n":"2","vd":"AQID"},'
               b'{"n":"3","vd":"AQI"},{"n":"4","bv":10,"v":1.5},{"n":"5"},{"n":"6","v":-1}]')

    assert values_of(decode(payload, SENML_JSON, (65, 0), NOW)) == {
        (65, 0, 0, 0): "66:0", (65, 0, 1): True, (65, 0, 2): b"\x01\x02\x03", (65, 0, 3): b"\x01\x02",
        (65, 0, 4): 11.5, (65, 0, 5): 10, (65, 0, 6): 9}


@pytest.mark.parametrize(("payload", "detail"), [
    (b"{", "invalid SenML JSON: Expecting property name enclosed in double quotes:"),
    (b'[{"n":"/3/0/1","v":NaN}]', "invalid SenML JSON: NaN is not JSON"),
    pytest.param(b"[" * 10_000 + b"]" * 10_000,
                 "invalid SenML JSON: maximum recursion depth exceeded while decoding a ", id="deep"),
    (b'{"n":"/3/0/1"}', "SenML: expected an array of records"),
    (b'[1]', "SenML: each record must be a map"),
    (b'[{"bn":1}]', "SenML: bn must be text"),
    (b'[{"n":1,"v":1}]', "SenML: n must be text"),
    (b'[{"n":"/3/0/1","v":"1"}]', "SenML: v must be a number"),
    (b'[{"n":"/3/0/1","v":true}]', "SenML: v must be a number"),
    (b'[{"n":"/3/0/1","v":18446744073709551616}]', "SenML: integer out of the 64-bit range"),
    (b'[{"n":"/3/0/1","v":1e400}]', "SenML: v is not finite"),
    (b'[{"n":"/3/0/1","vs":1}]', "SenML: vs must be text"),
    (b'[{"n":"/3/0/1","vb":1}]', "SenML: vb must be true or false"),
    (b'[{"n":"/3/0/1","vd":"a+b"}]', "SenML: vd must be base64url text"),
    (b'[{"n":"/3/0/1","vd":"a"}]', "SenML: vd is not valid base64url"),
    (b'[{"n":"/3/0/1","vlo":3}]', "SenML: vlo must be text"),
    (b'[{"n":"/3/0/1"}]', "SenML: the record for /3/0/1 has no value"),
    (b'[{"n":"/3/0/1","v":1,"bt":"x"}]', "SenML: bt must be a number"),
    (b'[{"n":"/3/0/1","v":1,"t":1e308,"bt":1e308}]', "SenML: time is not finite"),
    (b'[{"n":"/3/0/1","v":1,"ver_":2}]', "SenML: must-understand field 'ver_' is not understood"),
    (b'[{"n":"/3/0/x","v":1}]', "SenML name: not an LwM2M path: '/3/0/x'"),
    (b'[{"bn":"/3/0/","v":1}]', "SenML name: not an LwM2M path: '/3/0/'"),
    (b'[{"n":"/3/0","v":1}]', "SenML: /3/0 names no resource"),
    (b'[{"n":"/4/0/1","v":1}]', "/4/0/1 is outside the requested /3/0"),
    (b'[{"n":"/3/0/1/2/3","v":1}]', "SenML name: /3/0/1/2/3 has 5 levels, an LwM2M path at most 4"),
])
def test_senml_json_refusals(payload: bytes, detail: str) -> None:
    assert error_of(payload, SENML_JSON, (3, 0)) == detail


def test_senml_more_than_1000_records_is_refused() -> None:
    records = [{"n": f"/3303/{i}/5700", "v": i} for i in range(MAX_READINGS + 1)]

    assert len(decode(json.dumps(records[:-1]).encode(), SENML_JSON, (), NOW)) == MAX_READINGS
    assert error_of(json.dumps(records).encode(), SENML_JSON, ()) == "SenML: more than 1000 records"
    assert error_of(cbor2.dumps([{0: r["n"], 2: r["v"]} for r in records]), SENML_CBOR, ()) == (
        "SenML: more than 1000 records")


# -- SenML CBOR (RFC 8428 §6 labels) -------------------------------------------------------
def test_senml_cbor_device_instance() -> None:
    records = json.loads(DEVICE_SENML_JSON)
    labels = {"bn": -2, "n": 0, "v": 2, "vs": 3}
    payload = cbor2.dumps([{labels[k]: v for k, v in record.items()} for record in records])

    assert values_of(decode(payload, SENML_CBOR, (3, 0), NOW)) == DEVICE_VALUES


def test_senml_cbor_bytes_times_and_object_links() -> None:
    payload = cbor2.dumps([{-2: "/65/0/", -3: 1700000000, 0: "0/0", "vlo": "66:0"},
                           {0: "2", 8: b"\x01\x02", 6: 5}, {0: "1", 4: False, 6: 1e9}])

    assert decode(payload, SENML_CBOR, (65,), NOW) == [
        Reading((65, 0, 0, 0), "66:0", 1700000000.0), Reading((65, 0, 2), b"\x01\x02", 1700000005.0),
        Reading((65, 0, 1), False, 2700000000.0)]


@pytest.mark.parametrize(("records", "detail"), [
    ([{0: "/3/0/1", 8: "AQID"}], "SenML: vd must be a byte string"),
    ([{0: "/3/0/1", 2: float("nan")}], "SenML: v is not finite"),
    ([{0: "/3/0/1", 2: 1, 6: float("inf")}], "SenML: t is not finite"),
    ([{0: "/3/0/1", 4: 1}], "SenML: vb must be true or false"),
    ({0: "/3/0/1"}, "SenML: expected an array of records"),
])
def test_senml_cbor_refusals(records: Any, detail: str) -> None:
    assert error_of(cbor2.dumps(records), SENML_CBOR, (3, 0)) == detail


# -- encoding ------------------------------------------------------------------------------
def test_tlv_encoding_of_the_device_instance_is_the_spec_example_byte_for_byte() -> None:
    assert encode(DEVICE_VALUES, TLV, (3, 0)) == DEVICE_RESOURCES_TLV


def test_tlv_encoding_of_the_acl_object_is_the_spec_example_byte_for_byte() -> None:
    acl: dict[LwM2mPath, WriteValue] = {
        (2, 0, 0): 1, (2, 0, 1): 0, (2, 0, 2, 127): 7, (2, 0, 3): 127,
        (2, 2, 0): 3, (2, 2, 1): 0, (2, 2, 2, 127): 7, (2, 2, 2, 310): 1, (2, 2, 3): 127}

    assert encode(acl, TLV, (2,)) == ACL_TLV


def test_tlv_encoding_of_one_resource_and_one_resource_instance() -> None:
    assert encode({(3, 0, 14): "+02:00"}, TLV, (3, 0, 14)) == bytes([0xC6, 0x0E]) + b"+02:00"
    assert encode({(3, 0, 6, 0): 1, (3, 0, 6, 1): 5}, TLV, (3, 0, 6)) == bytes([0x86, 6, 65, 0, 1, 65, 1, 5])
    assert encode({(3, 0, 6, 1): 5}, TLV, (3, 0, 6, 1)) == bytes([0x41, 0x01, 0x05])


@pytest.mark.parametrize(("value", "raw"), [
    (0, b"\x00"), (-128, b"\x80"), (128, b"\x00\x80"), (-32769, b"\xff\xff\x7f\xff"),
    (2**31, b"\x00\x00\x00\x00\x80\x00\x00\x00"), (True, b"\x01"), (False, b"\x00"),
    (21.5, struct.pack(">f", 21.5)), (0.1, struct.pack(">d", 0.1)), (1e300, struct.pack(">d", 1e300)),
    (math.inf, struct.pack(">f", math.inf)), ("é", "é".encode()), (b"\x00", b"\x00"),
])
def test_tlv_values_take_the_fewest_bytes_that_hold_them_exactly(value: WriteValue, raw: bytes) -> None:
    encoded = encode({(1, 0, 0): value}, TLV, (1, 0, 0))

    assert encoded[-len(raw):] == raw and len(encoded) == len(raw) + (2 if len(raw) <= 7 else 3)


def test_tlv_encoding_picks_the_length_field_and_a_16_bit_id_when_needed() -> None:
    assert encode({(5, 0, 0): b"x" * 8}, TLV, (5, 0, 0))[:3] == bytes([0xC8, 0x00, 0x08])
    assert encode({(5, 0, 0): b"x" * 256}, TLV, (5, 0, 0))[:4] == bytes([0xD0, 0x00, 0x01, 0x00])
    assert encode({(5, 0, 0): b"x" * 65536}, TLV, (5, 0, 0))[:5] == bytes([0xD8, 0x00, 0x01, 0x00, 0x00])
    assert encode({(3303, 0, 5700): 1}, TLV, (3303, 0)) == bytes([0xE1, 0x16, 0x44, 0x01])


def test_senml_json_encoding_names_each_value_by_its_full_path() -> None:
    values: dict[LwM2mPath, WriteValue] = {
        (3303, 0, 5700): 21.5, (3303, 0, 5701): "Cel", (3303, 0, 5750): True,
        (3303, 0, 5800): b"\x01\x02", (3303, 0, 5603): -40}

    assert encode(values, SENML_JSON, (3303, 0)) == (
        b'[{"n":"/3303/0/5700","v":21.5},{"n":"/3303/0/5701","vs":"Cel"},{"n":"/3303/0/5750","vb":true},'
        b'{"n":"/3303/0/5800","vd":"AQI"},{"n":"/3303/0/5603","v":-40}]')
    assert cbor2.loads(encode(values, SENML_CBOR, (3303, 0))) == [
        {0: "/3303/0/5700", 2: 21.5}, {0: "/3303/0/5701", 3: "Cel"}, {0: "/3303/0/5750", 4: True},
        {0: "/3303/0/5800", 8: b"\x01\x02"}, {0: "/3303/0/5603", 2: -40}]


def test_lwm2m_cbor_encoding_keys_each_value_by_its_path_array() -> None:
    # Anjay Lite's single_resource vector
    assert encode({(13, 26, 1): 42}, LWM2M_CBOR, (13, 26)) == bytes.fromhex("A1830D181A01182A")


def test_text_opaque_and_cbor_encode_the_one_value() -> None:
    assert encode({(3, 0, 14): "+02:00"}, TEXT, (3, 0, 14)) == b"+02:00"
    assert encode({(1, 0, 1): 86400}, TEXT, (1, 0, 1)) == b"86400"
    assert encode({(1, 0, 6): True}, TEXT, (1, 0, 6)) == b"1"
    assert encode({(3303, 0, 5700): 21.5}, TEXT, (3303, 0, 5700)) == b"21.5"
    assert encode({(5, 0, 0): b"\x01\x02\x03\x04\x05"}, TEXT, (5, 0, 0)) == b"AQIDBAU="
    assert encode({(5, 0, 0): b"\x00\xff"}, OPAQUE, (5, 0, 0)) == b"\x00\xff"
    assert encode({(3303, 0, 5700): 21.5}, CBOR, (3303, 0, 5700)) == cbor2.dumps(21.5)


@pytest.mark.parametrize(("values", "content_format", "base", "detail"), [
    ({(3, 0, 7, 0): 1, (3, 0, 7, 1): 2}, TEXT, (3, 0, 7),
     "text/plain carries exactly one value, at the request path /3/0/7"),
    ({(3, 0, 2): "b"}, TEXT, (3, 0, 1), "/3/0/2 is outside /3/0/1"),
    ({(3, 0, 1): "b"}, TEXT, (3, 0), "text/plain carries exactly one value, at the request path /3/0"),
    ({(3, 0, 1): math.nan}, TEXT, (3, 0, 1), "text/plain cannot carry nan"),
    ({(5, 0, 0): "x"}, OPAQUE, (5, 0, 0), "opaque carries bytes, not a str"),
    ({(3, 0): 1}, TLV, (3,), "/3/0 is no resource"),
    ({(3, 0, 1, 2, 3): 1}, TLV, (3,), "write path: an LwM2M path has at most 4 levels, not 5"),
    ({(3, 0, 70000): 1}, TLV, (3, 0), "write path: the id at level 3 is not an integer in 0..65535"),
    ({(3, 0, 1): 1}, TLV, (), "TLV writes an object, instance or resource, not /"),
    ({(3, 0, 1): 2**63}, TLV, (3, 0), "TLV: integer out of the signed 64-bit range"),
    ({(3, 0, 1): 2**64}, LWM2M_CBOR, (3, 0), "write: integer out of the 64-bit range"),
    ({(3, 0, 6): 1, (3, 0, 6, 0): 1}, TLV, (3, 0), "TLV: /3/0/6 has both a value and resource instances"),
    ({(3, 0, 1): None}, SENML_JSON, (3, 0), "a NoneType is no LwM2M value (at /3/0/1)"),
    ({(3, 0, 1): "\ud800"}, SENML_JSON, (3, 0), "a string that is not valid Unicode (a lone surrogate)"),
    ({(3, 0, 1): math.inf}, SENML_JSON, (3, 0), "SenML cannot carry inf"),
    ({(3, 0, 1): 1}, LWM2M_JSON, (3, 0), "content format 11543 is not encoded"),
    ({(3, 0, i): 1 for i in range(MAX_READINGS + 1)}, LWM2M_CBOR, (3, 0),
     "more than 1000 values in one payload"),
])
def test_encode_refusals(values: dict[Any, Any], content_format: int, base: LwM2mPath, detail: str) -> None:
    with pytest.raises(ContentError) as caught:
        encode(values, content_format, base)
    assert caught.value.detail == detail


# -- round trips ---------------------------------------------------------------------------
ids = st.integers(0, 65535)
write_values: st.SearchStrategy[WriteValue] = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
    st.text(max_size=20), st.binary(max_size=20))


def kind_of(value: WriteValue) -> Kind:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    return "string" if isinstance(value, str) else "opaque"


Write = tuple[LwM2mPath, dict[LwM2mPath, WriteValue]]


@st.composite
def instance_writes(draw: st.DrawFn) -> Write:
    """A base (object or instance) and values below it: single resources and resource instances."""
    base: LwM2mPath = (draw(ids),) if draw(st.booleans()) else (draw(ids), draw(ids))
    values: dict[LwM2mPath, WriteValue] = {}
    for _ in range(draw(st.integers(1, 8))):
        path = base + tuple(draw(ids) for _ in range(3 - len(base)))
        if draw(st.booleans()):
            path = (*path, draw(ids))
        if any(is_under(p, path) or is_under(path, p) for p in values):
            continue  # a resource is single or multiple, not both
        values[path] = draw(write_values)
    return base, values


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same type (True == 1 and 1 == 1.0 must not pass for each other)."""
    return bool(a == b) and type(a) is type(b)


@FUZZ
@given(instance_writes(), st.sampled_from([SENML_JSON, SENML_CBOR, LWM2M_CBOR]))
def test_typed_formats_round_trip(write: Write, content_format: int) -> None:
    base, values = write

    readings = decode(encode(values, content_format, base), content_format, base, NOW)

    assert len(readings) == len(values)
    assert all(same(r.value, values[r.path]) and r.time is None for r in readings)


@FUZZ
@given(instance_writes())
def test_tlv_round_trips_through_as_kind(write: Write) -> None:
    base, values = write

    readings = decode(encode(values, TLV, base), TLV, base, NOW)

    assert len(readings) == len(values)
    assert all(same(as_kind(r.value, kind_of(values[r.path])), values[r.path]) for r in readings)


@FUZZ
@given(write_values, st.sampled_from([(3303, 0, 5700), (3, 0, 7, 1)]), st.sampled_from([TEXT, TLV, CBOR]))
def test_single_values_round_trip(value: WriteValue, base: LwM2mPath, content_format: int) -> None:
    [reading] = decode(encode({base: value}, content_format, base), content_format, base, NOW)

    assert reading.path == base
    assert same(as_kind(reading.value, kind_of(value)), value)


@FUZZ
@given(st.binary(max_size=40))
def test_opaque_round_trips(value: bytes) -> None:
    assert decode(encode({(5, 0, 0): value}, OPAQUE, (5, 0, 0)), OPAQUE, (5, 0, 0), NOW) == [
        Reading((5, 0, 0), value)]


# -- fuzzing: whatever the bytes, only ContentError ----------------------------------------
all_formats = st.sampled_from([TEXT, LINK, OPAQUE, CBOR, SENML_JSON, SENML_CBOR, TLV, TLV_LEGACY, LWM2M_JSON,
                               LWM2M_CBOR, 50, 65535])
bases = st.lists(ids, max_size=4).map(tuple)
cbor_items = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.integers(-8, 70000) | st.text(max_size=4) | st.tuples(ids, ids), inner, max_size=4),
    max_leaves=16)


def tlv_bytes(entries: list[tuple[int, int, bytes]]) -> bytes:
    """TLV entries with random type bits and ids around arbitrary bodies: near-valid nesting."""
    out = b""
    for type_bits, ident, body in entries:
        out += content._tlv_header(type_bits, ident, body)
    return out


tlv_payloads = st.recursive(
    st.binary(max_size=12),
    lambda inner: st.lists(st.tuples(st.integers(0, 3), st.integers(0, 300), inner), max_size=4)
    .map(tlv_bytes),
    max_leaves=12)


KINDS: tuple[Kind, ...] = ("integer", "float", "boolean", "string", "opaque")


def decodes_or_refuses(payload: bytes, content_format: int, base: LwM2mPath) -> None:
    try:
        readings = decode(payload, content_format, base, NOW)
    except ContentError as e:
        assert e.detail and len(e.detail) < 200
        return
    assert len(readings) <= MAX_READINGS
    assert all(is_under(r.path, base) and 3 <= len(r.path) <= 4 for r in readings)
    for reading in readings:
        for kind in KINDS:
            with contextlib.suppress(ContentError):
                as_kind(reading.value, kind)


@FUZZ
@given(st.binary(max_size=300), all_formats, bases)
def test_arbitrary_bytes_only_raise_content_error(payload: bytes, content_format: int,
                                                  base: LwM2mPath) -> None:
    decodes_or_refuses(payload, content_format, base)


@FUZZ
@given(cbor_items, st.sampled_from([CBOR, SENML_CBOR, LWM2M_CBOR]), bases)
def test_arbitrary_cbor_only_raises_content_error(item: Any, content_format: int, base: LwM2mPath) -> None:
    decodes_or_refuses(cbor2.dumps(item), content_format, base)


senml_labels = st.sampled_from(["bn", "n", "bt", "t", "v", "bv", "vs", "vb", "vd", "vlo", "x_"])
senml_values = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                | st.sampled_from(["/3/0/1", "1", "/3/0/", "0/1", "", "AQID", "/3"]))


@FUZZ
@given(st.lists(st.dictionaries(senml_labels, senml_values, max_size=5), max_size=5),
       st.sampled_from([SENML_JSON, SENML_CBOR]), bases)
def test_near_valid_senml_only_raises_content_error(records: list[dict[str, Any]], content_format: int,
                                                    base: LwM2mPath) -> None:
    labels = {"bn": -2, "n": 0, "bt": -3, "t": 6, "v": 2, "bv": -5, "vs": 3, "vb": 4, "vd": 8}
    if content_format == SENML_JSON:
        payload = json.dumps(records).encode()
    else:
        payload = cbor2.dumps([{labels.get(k, k): v for k, v in r.items()} for r in records])
    decodes_or_refuses(payload, content_format, base)


@FUZZ
@given(tlv_payloads, bases)
def test_near_valid_tlv_only_raises_content_error(payload: bytes, base: LwM2mPath) -> None:
    decodes_or_refuses(payload, TLV, base)
