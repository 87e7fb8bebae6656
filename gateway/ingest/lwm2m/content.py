"""LwM2M 1.1 payloads <-> readings: text, opaque, plain CBOR, TLV, SenML JSON/CBOR and LwM2M CBOR.

`decode` turns a Read/Notify/Send payload into `Reading`s with fully resolved paths, and
raises nothing but ContentError whatever the bytes; `encode` builds Write payloads. Both are
pure: no I/O, no object model (TLV bytes stay `Raw` until `as_kind` is told the type).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import cbor2

from gateway.ingest.lwm2m.paths import LwM2mPath, PathError, check_path, is_under, parse_path, render_path
from gateway.pipeline.codecs.base import DecodeError
from gateway.pipeline.codecs.cbor import loads as cbor_loads
from gateway.pipeline.codecs.senml import CBOR_LABELS, RELATIVE_TIME_LIMIT

# CoAP Content-Formats (the IANA registry; LwM2M 1.1 TS Transport §6.4).
TEXT = 0
LINK = 40
OPAQUE = 42
CBOR = 60
SENML_JSON = 110
SENML_CBOR = 112
TLV = 11542
LWM2M_JSON = 11543
LWM2M_CBOR = 11544
TLV_LEGACY = 1542  # the number LwM2M 1.0 clients sent before IANA assigned 11542

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_READINGS = 1000
# LwM2M CBOR map entries visited, empty maps included: cbor2 resolves shared references
# (tags 28/29), so a small payload can name one map many times over.
MAX_CBOR_ENTRIES = 10 * MAX_READINGS
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # LwM2M Integer and Unsigned Integer, both 64-bit


class ContentError(ValueError):
    """A payload that cannot be read (or values that cannot be written) in its Content-Format;
    `detail` is short and safe to show an operator."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Raw(bytes):
    """TLV resource bytes: the wire does not say whether 4 bytes are an Integer or a Float,
    so they stay bytes until `as_kind` is told the resource type."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Raw({bytes(self)!r})"


Value = int | float | bool | str | bytes | Raw
Kind = Literal["integer", "float", "boolean", "string", "opaque"]
WriteValue = int | float | bool | str | bytes
_Items = list[tuple[LwM2mPath, WriteValue]]


@dataclass(frozen=True, slots=True)
class Reading:
    """One value at one resource (or resource instance) path; `time` in Unix seconds when the
    payload said when (SenML), None when it did not."""

    path: LwM2mPath
    value: Value
    time: float | None = None


# -- decoding ------------------------------------------------------------------------------
def decode(payload: bytes, content_format: int, base: LwM2mPath, now: float) -> list[Reading]:
    """Readings in `payload`, answered to a request on `base` (the path Read/Observe named,
    () for Send or a composite). `now` resolves SenML relative times."""
    base = _checked_base(base)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ContentError(f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit")
    decoder = _DECODERS.get(content_format)
    if decoder is None:
        raise ContentError(f"content format {content_format} is not decoded")
    readings = decoder(bytes(payload), base, now)
    for reading in readings:
        if not is_under(reading.path, base):
            raise ContentError(f"{render_path(reading.path)} is outside the requested {render_path(base)}")
    return readings


def _checked_base(base: LwM2mPath) -> LwM2mPath:
    try:
        return check_path(tuple(base))
    except PathError as e:
        raise ContentError(f"request path: {e.detail}") from None


def _single_resource(base: LwM2mPath, what: str) -> None:
    if len(base) < 3:
        raise ContentError(f"{what} carries one resource value; {render_path(base)} is not a resource")


def _decode_text(payload: bytes, base: LwM2mPath, now: float) -> list[Reading]:
    _single_resource(base, "text/plain")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ContentError(f"text/plain is not UTF-8 at byte {e.start}") from None
    return [Reading(base, text)]


def _decode_opaque(payload: bytes, base: LwM2mPath, now: float) -> list[Reading]:
    _single_resource(base, "opaque")
    return [Reading(base, payload)]


def _decode_plain_cbor(payload: bytes, base: LwM2mPath, now: float) -> list[Reading]:
    _single_resource(base, "CBOR")
    return [Reading(base, _cbor_value(_cbor_item(payload, "CBOR"), "CBOR", base))]


def _cbor_item(payload: bytes, what: str) -> Any:
    try:
        return cbor_loads(payload, what)
    except DecodeError as e:
        raise ContentError(e.detail) from None


def _cbor_value(item: Any, what: str, path: LwM2mPath) -> Value:
    """A CBOR data item as an LwM2M value: tag 1 (Time) -> seconds, tag 4/5 -> float."""
    if isinstance(item, bool | str | float):
        return item
    if isinstance(item, int):
        return _in_int_range(item, what)
    if isinstance(item, bytes):
        return bytes(item)
    if isinstance(item, Decimal):
        try:
            return float(item)
        except (ValueError, ArithmeticError):
            raise ContentError(f"{what}: unreadable decimal at {render_path(path)}") from None
    if isinstance(item, datetime):
        try:
            seconds = item.timestamp()
        except (OverflowError, OSError, ValueError):
            raise ContentError(f"{what}: time out of range at {render_path(path)}") from None
        return int(seconds) if seconds.is_integer() else seconds
    if item is None:
        raise ContentError(f"{what}: null value at {render_path(path)}")
    raise ContentError(f"{what}: a {type(item).__name__} is no LwM2M value (at {render_path(path)})")


def _in_int_range(value: int, what: str) -> int:
    if not _INT_MIN <= value <= _INT_MAX:
        raise ContentError(f"{what}: integer out of the 64-bit range")
    return value


class _Collector:
    """Readings of one payload, under the cap; `unique` rejects a path seen twice."""

    def __init__(self, unique: bool) -> None:
        self.readings: list[Reading] = []
        self._seen: set[LwM2mPath] | None = set() if unique else None

    def add(self, path: LwM2mPath, value: Value, time: float | None = None) -> None:
        if len(self.readings) >= MAX_READINGS:
            raise ContentError(f"more than {MAX_READINGS} values in one payload")
        self.add_node(path)
        self.readings.append(Reading(path, value, time))

    def add_node(self, path: LwM2mPath) -> None:
        """An instance or multiple resource: two of them with one id are refused too."""
        if self._seen is not None:
            if path in self._seen:
                raise ContentError(f"{render_path(path)} appears twice")
            self._seen.add(path)


# TLV (TS Core 1.1 §7.4.3): the top two bits of the type byte say what the identifier names.
_TLV_OBJECT_INSTANCE, _TLV_RESOURCE_INSTANCE, _TLV_MULTIPLE_RESOURCE, _TLV_RESOURCE = 0, 1, 2, 3
_TLV_DEPTH = {_TLV_OBJECT_INSTANCE: 2, _TLV_RESOURCE_INSTANCE: 4, _TLV_MULTIPLE_RESOURCE: 3, _TLV_RESOURCE: 3}
_TLV_NAME = {_TLV_OBJECT_INSTANCE: "object instance", _TLV_RESOURCE_INSTANCE: "resource instance",
             _TLV_MULTIPLE_RESOURCE: "multiple resource", _TLV_RESOURCE: "resource"}
_TLV_CHILDREN = {_TLV_OBJECT_INSTANCE: {_TLV_RESOURCE, _TLV_MULTIPLE_RESOURCE},
                 _TLV_MULTIPLE_RESOURCE: {_TLV_RESOURCE_INSTANCE}}


@dataclass(frozen=True, slots=True)
class _Tlv:
    kind: int
    ident: int
    at: int  # the type byte's offset in the payload
    start: int  # the value's
    end: int


def _tlv_entries(payload: bytes, start: int, end: int) -> list[_Tlv]:
    entries = []
    where = "the payload" if start == 0 else "its enclosing TLV"
    pos = start
    while pos < end:
        at = pos
        type_byte = payload[pos]
        id_bytes = 2 if type_byte & 0x20 else 1
        length_bytes = (type_byte >> 3) & 0x03
        pos += 1
        if pos + id_bytes + length_bytes > end:
            raise ContentError(f"TLV header runs past {where} at byte {at}")
        ident = int.from_bytes(payload[pos:pos + id_bytes], "big")
        pos += id_bytes
        if length_bytes:
            length = int.from_bytes(payload[pos:pos + length_bytes], "big")
            pos += length_bytes
        else:
            length = type_byte & 0x07
        if pos + length > end:
            raise ContentError(f"TLV length runs past {where} at byte {at}")
        entries.append(_Tlv(type_byte >> 6, ident, at, pos, pos + length))
        pos += length
    return entries


def _decode_tlv(payload: bytes, base: LwM2mPath, now: float) -> list[Reading]:
    if not base:
        raise ContentError("TLV answers a request on an object, instance or resource, not /")
    found = _Collector(unique=True)
    for tlv in _tlv_entries(payload, 0, len(payload)):
        depth = _TLV_DEPTH[tlv.kind]
        if depth == len(base) + 1:
            path = (*base, tlv.ident)
        elif depth <= len(base) and tlv.ident == base[depth - 1]:
            # The payload repeats the requested node or one above it (TS Core §7.4.3 example
            # A; Leshan accepts an instance TLV around a single resource): anything in it
            # outside the request is refused by decode().
            path = base[:depth]
        elif depth <= len(base):
            raise ContentError(f"TLV {_TLV_NAME[tlv.kind]} {tlv.ident} in the answer to a request on "
                               f"{render_path(base)}")
        else:
            raise ContentError(f"a TLV {_TLV_NAME[tlv.kind]} cannot answer a request on {render_path(base)}")
        _tlv_node(payload, tlv, path, found)
    return found.readings


def _tlv_node(payload: bytes, tlv: _Tlv, path: LwM2mPath, found: _Collector) -> None:
    children = _TLV_CHILDREN.get(tlv.kind)
    if children is None:
        found.add(path, Raw(payload[tlv.start:tlv.end]))
        return
    found.add_node(path)
    for child in _tlv_entries(payload, tlv.start, tlv.end):
        if child.kind not in children:
            raise ContentError(f"a TLV {_TLV_NAME[child.kind]} inside {_TLV_NAME[tlv.kind]} "
                               f"{render_path(path)} at byte {child.at}")
        _tlv_node(payload, child, (*path, child.ident), found)


# LwM2M CBOR (TS Core 1.1.1 §7.4.6): a map whose keys are an id or an array of ids, each
# key extending the path of its enclosing map; a value that is not a map is a resource
# (or resource instance) value. Paths are absolute, from the root.
def _decode_lwm2m_cbor(payload: bytes, base: LwM2mPath, now: float) -> list[Reading]:
    item = _cbor_item(payload, "LwM2M CBOR")
    if not isinstance(item, dict):
        raise ContentError("LwM2M CBOR: expected a map of path -> value")
    found = _Collector(unique=True)
    _lwm2m_cbor_map(item, (), found, [MAX_CBOR_ENTRIES])
    return found.readings


def _lwm2m_cbor_map(node: dict[Any, Any], prefix: LwM2mPath, found: _Collector, budget: list[int]) -> None:
    for key, value in node.items():
        budget[0] -= 1
        if budget[0] < 0:
            raise ContentError(f"LwM2M CBOR: more than {MAX_CBOR_ENTRIES} map entries")
        path = (*prefix, *_lwm2m_cbor_key(key))
        if len(path) > 4:
            raise ContentError(f"LwM2M CBOR: a path deeper than 4 levels under {render_path(prefix)}")
        if isinstance(value, dict):
            _lwm2m_cbor_map(value, path, found, budget)
            continue
        if len(path) < 3:
            raise ContentError(f"LwM2M CBOR: a value at {render_path(path)}, which is no resource")
        found.add(path, _cbor_value(value, "LwM2M CBOR", path))


def _lwm2m_cbor_key(key: Any) -> LwM2mPath:
    ids = key if isinstance(key, tuple) else (key,)
    if not ids:
        raise ContentError("LwM2M CBOR: an empty array as a key")
    for part in ids:
        if isinstance(part, bool) or not isinstance(part, int) or not 0 <= part <= 65535:
            raise ContentError("LwM2M CBOR: a key is an id (0..65535) or an array of ids")
    return tuple(ids)


# SenML JSON and CBOR (RFC 8428), with LwM2M's names (TS Core §7.4.4/§7.4.5): bn + n is a
# path; a relative one (or none) is resolved against the request path.
def _decode_senml_json(payload: bytes, base: LwM2mPath, now: float) -> list[Reading]:
    try:
        pack = json.loads(payload, parse_constant=_no_json_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, constants
        raise ContentError(f"invalid SenML JSON: {str(e)[:50]}") from None
    return _senml_readings(pack, base, now, _json_data)


def _no_json_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _json_data(value: Any) -> bytes:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]*={0,2}", value):
        raise ContentError("SenML: vd must be base64url text")
    try:
        return base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
    except (binascii.Error, ValueError):
        raise ContentError("SenML: vd is not valid base64url") from None


def _decode_senml_cbor(payload: bytes, base: LwM2mPath, now: float) -> list[Reading]:
    pack = _cbor_item(payload, "SenML CBOR")
    if isinstance(pack, list):
        pack = [
            {CBOR_LABELS.get(k, k) if isinstance(k, int) and not isinstance(k, bool) else k: v
             for k, v in record.items()} if isinstance(record, dict) else record
            for record in pack[: MAX_READINGS + 1]
        ]
    return _senml_readings(pack, base, now, _cbor_data)


def _cbor_data(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise ContentError("SenML: vd must be a byte string")
    return bytes(value)


def _senml_number(value: Any, label: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ContentError(f"SenML: {label} must be a number")
    if isinstance(value, int):
        return _in_int_range(value, "SenML")
    if not math.isfinite(value):
        raise ContentError(f"SenML: {label} is not finite")
    return value


def _senml_readings(pack: Any, base: LwM2mPath, now: float, data: Callable[[Any], bytes]) -> list[Reading]:
    if not isinstance(pack, list):
        raise ContentError("SenML: expected an array of records")
    if len(pack) > MAX_READINGS:
        raise ContentError(f"SenML: more than {MAX_READINGS} records")
    found = _Collector(unique=False)  # a Send may carry one resource at several times
    base_name, base_time, base_value = "", None, None
    for record in pack:
        if not isinstance(record, dict):
            raise ContentError("SenML: each record must be a map")
        for label in record:
            if isinstance(label, str) and label.endswith("_"):
                raise ContentError(f"SenML: must-understand field {label[:20]!r} is not understood")
        if "bn" in record:
            if not isinstance(record["bn"], str):
                raise ContentError("SenML: bn must be text")
            base_name = record["bn"]
        if "bt" in record:
            base_time = _senml_number(record["bt"], "bt")
        if "bv" in record:
            base_value = _senml_number(record["bv"], "bv")
        name = record.get("n", "")
        if not isinstance(name, str):
            raise ContentError("SenML: n must be text")
        path = _senml_path(base_name + name, base)
        value = _senml_value(record, base_value, data, path)
        found.add(path, value, _senml_time(record, base_time, now))
    return found.readings


def _senml_path(name: str, base: LwM2mPath) -> LwM2mPath:
    if not name:
        full = render_path(base)
    elif name.startswith("/"):
        full = name
    else:
        full = render_path(base).rstrip("/") + "/" + name
    try:
        path = parse_path(full)
    except PathError as e:
        raise ContentError(f"SenML name: {e.detail}") from None
    if len(path) < 3:
        raise ContentError(f"SenML: {render_path(path)} names no resource")
    return path


def _senml_value(record: dict[Any, Any], base_value: int | float | None,
                 data: Callable[[Any], bytes], path: LwM2mPath) -> Value:
    if "v" in record:
        return _senml_number(record["v"], "v") + (base_value or 0)
    if "vs" in record:
        if not isinstance(record["vs"], str):
            raise ContentError("SenML: vs must be text")
        return str(record["vs"])
    if "vb" in record:
        if not isinstance(record["vb"], bool):
            raise ContentError("SenML: vb must be true or false")
        return bool(record["vb"])
    if "vd" in record:
        return data(record["vd"])
    if "vlo" in record:  # LwM2M's Objlnk, "3:0"
        if not isinstance(record["vlo"], str):
            raise ContentError("SenML: vlo must be text")
        return str(record["vlo"])
    if base_value is not None:
        return base_value
    raise ContentError(f"SenML: the record for {render_path(path)} has no value")


def _senml_time(record: dict[Any, Any], base_time: int | float | None, now: float) -> float | None:
    """RFC 8428 §4.5.3: bt + t; below 2**28 it is relative to now. None when neither is set."""
    if "t" not in record and base_time is None:
        return None
    time = float((base_time or 0) + _senml_number(record.get("t", 0), "t"))
    if not math.isfinite(time):
        raise ContentError("SenML: time is not finite")
    return now + time if time < RELATIVE_TIME_LIMIT else time


def _decode_unsupported(payload: bytes, base: LwM2mPath, now: float) -> list[Reading]:
    raise ContentError("OMA LwM2M JSON (11543) is not decoded: ask for SenML JSON (110)")


def _decode_link(payload: bytes, base: LwM2mPath, now: float) -> list[Reading]:
    raise ContentError("link-format (40) carries links, not values")


_DECODERS: dict[int, Callable[[bytes, LwM2mPath, float], list[Reading]]] = {
    TEXT: _decode_text,
    LINK: _decode_link,
    OPAQUE: _decode_opaque,
    CBOR: _decode_plain_cbor,
    SENML_JSON: _decode_senml_json,
    SENML_CBOR: _decode_senml_cbor,
    TLV: _decode_tlv,
    TLV_LEGACY: _decode_tlv,
    LWM2M_JSON: _decode_unsupported,
    LWM2M_CBOR: _decode_lwm2m_cbor,
}


# -- typing a value ------------------------------------------------------------------------
_TEXT_INTEGER = re.compile(r"[+-]?[0-9]{1,20}")
_TEXT_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?")
_TLV_INT_FORMATS = {1: ">b", 2: ">h", 4: ">i", 8: ">q"}
_TLV_FLOAT_FORMATS = {4: ">f", 8: ">d"}


def as_kind(value: Value, kind: Kind) -> int | float | bool | str | bytes:
    """`value` as the LwM2M data type `kind` (from the object model): Raw TLV bytes and
    text/plain strings are read as that type; typed values convert only without loss."""
    if isinstance(value, Raw):
        return _raw_as(value, kind)
    if isinstance(value, str):
        return _text_as(value, kind)
    if isinstance(value, bytes):
        if kind == "opaque":
            return bytes(value)
    elif isinstance(value, bool):
        if kind == "boolean":
            return value
    elif isinstance(value, int):
        if kind == "integer":
            return value
        if kind == "float":
            return float(value)
    elif isinstance(value, float):
        if kind == "float":
            return value
        if kind == "integer" and value.is_integer():
            return int(value)
    if kind not in _KINDS:
        raise ValueError(f"unknown LwM2M data type {kind!r}")
    raise ContentError(f"a {type(value).__name__} value is not {_ARTICLE[kind]}")


_KINDS = ("integer", "float", "boolean", "string", "opaque")
_ARTICLE = {"integer": "an integer", "float": "a float", "boolean": "a boolean",
            "string": "a string", "opaque": "opaque"}


def _raw_as(raw: Raw, kind: Kind) -> int | float | bool | str | bytes:
    if kind == "integer":
        int_format = _TLV_INT_FORMATS.get(len(raw))
        if int_format is None:
            raise ContentError(f"a TLV integer is 1, 2, 4 or 8 bytes, not {len(raw)}")
        return int(struct.unpack(int_format, raw)[0])
    if kind == "float":
        float_format = _TLV_FLOAT_FORMATS.get(len(raw))
        if float_format is None:
            raise ContentError(f"a TLV float is 4 or 8 bytes, not {len(raw)}")
        return float(struct.unpack(float_format, raw)[0])
    if kind == "boolean":
        if raw not in (b"\x00", b"\x01"):
            raise ContentError("a TLV boolean is one byte, 0 or 1")
        return raw == b"\x01"
    if kind == "string":
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ContentError(f"a TLV string is not UTF-8 at byte {e.start}") from None
    if kind == "opaque":
        return bytes(raw)
    raise ValueError(f"unknown LwM2M data type {kind!r}")


def _text_as(text: str, kind: Kind) -> int | float | bool | str | bytes:
    if kind == "string":
        return text
    if kind == "integer":
        if not _TEXT_INTEGER.fullmatch(text):
            raise ContentError(f"{text[:20]!r} is not an integer")
        return _in_int_range(int(text), "text")
    if kind == "float":
        number = float(text) if _TEXT_FLOAT.fullmatch(text) else math.nan
        if not math.isfinite(number):
            raise ContentError(f"{text[:20]!r} is not a float")
        return number
    if kind == "boolean":
        if text not in ("0", "1"):
            raise ContentError(f"{text[:20]!r} is not a boolean (0 or 1)")
        return text == "1"
    if kind == "opaque":  # TS Core §7.4.1: opaque in text/plain is base64
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ContentError("text/plain opaque is not valid base64") from None
    raise ValueError(f"unknown LwM2M data type {kind!r}")


# -- encoding ------------------------------------------------------------------------------
def encode(values: Mapping[LwM2mPath, WriteValue], content_format: int, base: LwM2mPath) -> bytes:
    """A Write/Create payload on `base` for `values`, keyed by absolute resource (or resource
    instance) paths under `base`. TEXT, OPAQUE and CBOR take exactly one value, at `base`."""
    base = _checked_base(base)
    if len(values) > MAX_READINGS:
        raise ContentError(f"more than {MAX_READINGS} values in one payload")
    for path, value in values.items():
        try:
            check_path(path)
        except PathError as e:
            raise ContentError(f"write path: {e.detail}") from None
        if len(path) < 3:
            raise ContentError(f"{render_path(path)} is no resource")
        if not is_under(path, base):
            raise ContentError(f"{render_path(path)} is outside {render_path(base)}")
        if isinstance(value, int) and not isinstance(value, bool):
            _in_int_range(value, "write")
        elif isinstance(value, str):
            _utf8(value)
        elif not isinstance(value, bool | float | bytes):
            raise ContentError(f"a {type(value).__name__} is no LwM2M value (at {render_path(path)})")
    encoder = _ENCODERS.get(content_format)
    if encoder is None:
        raise ContentError(f"content format {content_format} is not encoded")
    return encoder(values, base)


def _only_value(values: Mapping[LwM2mPath, WriteValue], base: LwM2mPath, what: str) -> WriteValue:
    if len(values) != 1 or base not in values:
        raise ContentError(f"{what} carries exactly one value, at the request path {render_path(base)}")
    return values[base]


def _encode_text(values: Mapping[LwM2mPath, WriteValue], base: LwM2mPath) -> bytes:
    value = _only_value(values, base, "text/plain")
    if isinstance(value, bool):
        return b"1" if value else b"0"
    if isinstance(value, bytes):
        return base64.b64encode(value)
    if isinstance(value, float):
        return repr(_finite(value, "text/plain")).encode()
    return str(value).encode()


def _encode_opaque(values: Mapping[LwM2mPath, WriteValue], base: LwM2mPath) -> bytes:
    value = _only_value(values, base, "opaque")
    if not isinstance(value, bytes):
        raise ContentError(f"opaque carries bytes, not a {type(value).__name__}")
    return bytes(value)


def _encode_plain_cbor(values: Mapping[LwM2mPath, WriteValue], base: LwM2mPath) -> bytes:
    return bytes(cbor2.dumps(_only_value(values, base, "CBOR")))


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ContentError(f"{what} cannot carry {value}")
    return value


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ContentError("a string that is not valid Unicode (a lone surrogate)") from None


def _encode_tlv(values: Mapping[LwM2mPath, WriteValue], base: LwM2mPath) -> bytes:
    """Resources of an instance go out bare (no object instance wrapper), one resource as a
    single TLV of its own; instances of an object each as an object instance TLV."""
    if not base:
        raise ContentError("TLV writes an object, instance or resource, not /")
    items = list(values.items())
    if len(base) >= 3:
        return _tlv_encode_node(base, items)
    groups = _tlv_group(items, len(base))
    return b"".join(_tlv_encode_node((*base, ident), groups[ident]) for ident in sorted(groups))


def _tlv_group(items: _Items, level: int) -> dict[int, _Items]:
    groups: dict[int, _Items] = defaultdict(list)
    for path, value in items:
        groups[path[level]].append((path, value))
    return groups


def _tlv_encode_node(path: LwM2mPath, items: _Items) -> bytes:
    depth = len(path)
    if any(item_path == path for item_path, _ in items):
        if len(items) != 1:
            raise ContentError(f"TLV: {render_path(path)} has both a value and resource instances")
        kind = _TLV_RESOURCE_INSTANCE if depth == 4 else _TLV_RESOURCE
        return _tlv_header(kind, path[-1], _tlv_value(items[0][1]))
    groups = _tlv_group(items, depth)
    body = b"".join(_tlv_encode_node((*path, ident), groups[ident]) for ident in sorted(groups))
    kind = _TLV_OBJECT_INSTANCE if depth == 2 else _TLV_MULTIPLE_RESOURCE
    return _tlv_header(kind, path[-1], body)


def _tlv_header(kind: int, ident: int, body: bytes) -> bytes:
    type_byte = kind << 6
    id_bytes = ident.to_bytes(1 if ident <= 0xFF else 2, "big")
    if ident > 0xFF:
        type_byte |= 0x20
    length = len(body)
    if length <= 0x07:
        type_byte |= length
        length_bytes = b""
    else:
        width = 1 if length <= 0xFF else 2 if length <= 0xFFFF else 3
        if length > 0xFFFFFF:
            raise ContentError("TLV: a value over 16 MiB")
        type_byte |= width << 3
        length_bytes = length.to_bytes(width, "big")
    return bytes((type_byte,)) + id_bytes + length_bytes + body


def _tlv_value(value: WriteValue) -> bytes:
    """Integers in the fewest of 1/2/4/8 bytes; a float in 4 bytes when a float32 holds it
    exactly, else 8: no precision is lost and NB-IoT radios carry fewer bytes."""
    if isinstance(value, bool):
        return b"\x01" if value else b"\x00"
    if isinstance(value, int):
        for width in (1, 2, 4, 8):
            if -(1 << (8 * width - 1)) <= value < 1 << (8 * width - 1):
                return value.to_bytes(width, "big", signed=True)
        raise ContentError("TLV: integer out of the signed 64-bit range")
    if isinstance(value, float):
        try:
            single = struct.pack(">f", value)
        except OverflowError:
            return struct.pack(">d", value)
        return single if struct.unpack(">f", single)[0] == value else struct.pack(">d", value)
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


def _senml_records(values: Mapping[LwM2mPath, WriteValue],
                   data: Callable[[bytes], Any]) -> list[dict[str, Any]]:
    """One record per value, each named by its full path (no bn: every name is absolute)."""
    records = []
    for path, value in values.items():
        record: dict[str, Any] = {"n": render_path(path)}
        if isinstance(value, bool):
            record["vb"] = value
        elif isinstance(value, int | float):
            record["v"] = _finite(value, "SenML") if isinstance(value, float) else value
        elif isinstance(value, str):
            record["vs"] = value
        else:
            record["vd"] = data(bytes(value))
        records.append(record)
    return records


def _encode_senml_json(values: Mapping[LwM2mPath, WriteValue], base: LwM2mPath) -> bytes:
    records = _senml_records(values, lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=").decode())
    return json.dumps(records, separators=(",", ":"), allow_nan=False).encode()


_SENML_CBOR_LABEL = {name: label for label, name in CBOR_LABELS.items()}


def _encode_senml_cbor(values: Mapping[LwM2mPath, WriteValue], base: LwM2mPath) -> bytes:
    records = [{_SENML_CBOR_LABEL[k]: v for k, v in record.items()}
               for record in _senml_records(values, lambda raw: raw)]
    return bytes(cbor2.dumps(records))


def _encode_lwm2m_cbor(values: Mapping[LwM2mPath, WriteValue], base: LwM2mPath) -> bytes:
    """One map entry per value, keyed by its full path as an array of ids."""
    return bytes(cbor2.dumps({tuple(path): value for path, value in values.items()}))


_ENCODERS: dict[int, Callable[[Mapping[LwM2mPath, WriteValue], LwM2mPath], bytes]] = {
    TEXT: _encode_text,
    OPAQUE: _encode_opaque,
    CBOR: _encode_plain_cbor,
    SENML_JSON: _encode_senml_json,
    SENML_CBOR: _encode_senml_cbor,
    TLV: _encode_tlv,
    TLV_LEGACY: _encode_tlv,
    LWM2M_CBOR: _encode_lwm2m_cbor,
}
