"""Device-type schemas: one strict pydantic model per type, built from `[types]` once.

Validates a decoded report (known fields, numbers, ranges, required fields, units) and
maps a failure to a reason slug. Never touches I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from gateway.config import RESERVED_FIELDS, DeviceType
from gateway.pipeline.codecs import Decoded

# pydantic error type -> the reason label of nbiot_gateway_uplinks_rejected_total
_REASONS = {
    "extra_forbidden": "unknown_field",
    "missing": "missing_field",
    "greater_than_equal": "out_of_range",
    "less_than_equal": "out_of_range",
}

# 9999-12-31T23:59:59Z, the last second a datetime can show: a device clock past it is broken
# (or counts milliseconds), and rejecting it here keeps the RFC 3339 formatting total.
MAX_DEVICE_TIME_S = 253_402_300_799


class SchemaViolation(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True, frozen=True)
class Report:
    seq: int | None
    device_time: float | None
    values: dict[str, float]
    ack: str | None = None  # the id of a downlink command the device confirms


class TypeSchema:
    """Validator of one device type's reports."""

    def __init__(self, name: str, spec: DeviceType) -> None:
        self.name = name
        self.units = {f: s.unit for f, s in spec.fields.items()}
        definitions: dict[str, Any] = {
            "seq": (int | None, Field(None, ge=0, le=2**63 - 1)),
            "ts": (float | None, Field(None, ge=0, le=MAX_DEVICE_TIME_S, allow_inf_nan=False)),
            "ack": (str | None, Field(None, min_length=1, max_length=64)),
        }
        optional = dict(definitions)
        for fname, fs in spec.fields.items():
            constraint = Field(
                ... if fs.required else None, ge=fs.min, le=fs.max, allow_inf_nan=False
            )
            definitions[fname] = (float if fs.required else float | None, constraint)
            optional[fname] = (float | None, Field(None, ge=fs.min, le=fs.max,
                                                   allow_inf_nan=False))
        config = ConfigDict(extra="forbid", strict=True)
        self._model: type[BaseModel] = create_model(
            f"Report_{name}", __config__=config, **definitions)
        # A report of some of the fields (an LwM2M notification carries one resource):
        # the same checks, no field required.
        self._partial_model: type[BaseModel] = create_model(
            f"PartialReport_{name}", __config__=config, **optional)

    def validate(self, decoded: Decoded, partial: bool = False) -> Report:
        # Units first: a value in the wrong unit is often out of range too, and the unit is
        # what the device must fix.
        for fname, unit in decoded.units.items():
            expected = self.units.get(fname)
            if expected and unit != expected:
                raise SchemaViolation("wrong_unit", f"{fname}: unit {unit[:16]!r}, expected {expected!r}")
        try:
            model = (self._partial_model if partial else self._model).model_validate(
                decoded.fields)
        except ValidationError as e:
            first = e.errors(include_url=False, include_context=False)[0]
            loc = ".".join(str(p) for p in first["loc"]) or "payload"
            reason = _REASONS.get(first["type"], "wrong_type")
            raise SchemaViolation(reason, f"{loc}: {first['msg']}"[:96]) from None
        data = model.__dict__
        values = {k: v for k, v in data.items() if v is not None and k not in RESERVED_FIELDS}
        return Report(seq=data["seq"], device_time=data["ts"], values=values, ack=data["ack"])


def build_schemas(types: Mapping[str, DeviceType]) -> dict[str, TypeSchema]:
    return {name: TypeSchema(name, spec) for name, spec in types.items()}
