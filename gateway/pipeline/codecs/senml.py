"""Content-Formats 110 and 112: SenML packs (RFC 8428) in JSON or CBOR.

Each record's name (base name + name) ends in the field name: `urn:dev:x:temperature`,
`dev1/temperature` and `temperature` all name `temperature`. A record named `seq`
carries the sequence number; an absolute time (>= 2**28) becomes the device time.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gateway.pipeline.codecs.base import Decoded, DecodeError
from gateway.pipeline.codecs.cbor import loads as cbor_loads

# RFC 8428 section 6: CBOR integer labels.
CBOR_LABELS = {-1: "bver", -2: "bn", -3: "bt", -4: "bu", -5: "bv", -6: "bs",
               0: "n", 1: "u", 2: "v", 3: "vs", 4: "vb", 5: "s", 6: "t", 7: "ut", 8: "vd"}
RELATIVE_TIME_LIMIT = 2**28
_FIELD_TAIL = re.compile(r"[^:/]*$")
MAX_RECORDS = 256
_MAX_INT = 2**1023  # ints beyond this do not convert to float


def decode_json(payload: bytes) -> Decoded:
    try:
        pack = json.loads(payload)
    except (ValueError, RecursionError) as e:
        raise DecodeError(f"invalid SenML JSON: {str(e)[:50]}") from None
    return _flatten(pack)


def decode_cbor(payload: bytes) -> Decoded:
    pack = cbor_loads(payload, "SenML CBOR")
    if isinstance(pack, list):
        pack = [
            {CBOR_LABELS.get(k, k) if isinstance(k, int) else k: v for k, v in rec.items()}
            if isinstance(rec, dict) else rec
            for rec in pack[: MAX_RECORDS + 1]
        ]
    return _flatten(pack)


def _number(value: Any, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DecodeError(f"SenML: {label} must be a number")
    if isinstance(value, int) and not -_MAX_INT <= value <= _MAX_INT:
        # Past a double's range `bt + t` and `bv + v` would raise OverflowError.
        raise DecodeError(f"SenML: {label} out of range")
    return value


def _flatten(pack: Any) -> Decoded:
    if not isinstance(pack, list) or not pack:
        raise DecodeError("SenML: expected a non-empty array of records")
    if len(pack) > MAX_RECORDS:
        raise DecodeError(f"SenML: more than {MAX_RECORDS} records")
    fields: dict[str, Any] = {}
    units: dict[str, str] = {}
    base_name, base_time, base_unit, base_value = "", 0.0, None, None
    device_time: float | None = None
    for rec in pack:
        if not isinstance(rec, dict):
            raise DecodeError("SenML: each record must be a map")
        for label in rec:  # RFC 8428 §4.4: a label ending in "_" must be understood
            if isinstance(label, str) and label.endswith("_"):
                raise DecodeError(f"SenML: must-understand field {label[:20]!r} is not understood")
        if "bn" in rec:
            if not isinstance(rec["bn"], str):
                raise DecodeError("SenML: bn must be text")
            base_name = rec["bn"]
        if "bt" in rec:
            base_time = _number(rec["bt"], "bt")
        if "bu" in rec:
            base_unit = rec["bu"] if isinstance(rec["bu"], str) else None
        if "bv" in rec:
            base_value = _number(rec["bv"], "bv")
        name = rec.get("n", "")
        if not isinstance(name, str):
            raise DecodeError("SenML: n must be text")
        full_name = base_name + name
        field_name = _FIELD_TAIL.search(full_name).group(0)  # type: ignore[union-attr]
        if not field_name:
            raise DecodeError("SenML: record without a name")
        if "v" in rec:
            value: Any = _number(rec["v"], "v") + (base_value or 0)
        elif "vs" in rec or "vb" in rec or "vd" in rec:
            value = rec.get("vs", rec.get("vb", rec.get("vd")))  # the schema rejects non-numbers
        elif base_value is not None:
            value = base_value
        else:
            raise DecodeError(f"SenML: record {field_name!r} has no value")
        if field_name in fields:
            raise DecodeError(f"SenML: {field_name!r} appears twice")
        fields[field_name] = value
        unit = rec.get("u", base_unit)
        if isinstance(unit, str) and unit:
            units[field_name] = unit
        t = base_time + _number(rec.get("t", 0), "t")
        if device_time is None and t >= RELATIVE_TIME_LIMIT:
            device_time = t
    if device_time is not None and "ts" not in fields:
        fields["ts"] = device_time
    return Decoded(fields, units)
