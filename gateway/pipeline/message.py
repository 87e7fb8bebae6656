"""The MQTT message of an accepted uplink, as JSON built from pre-rendered pieces.

`json.dumps` of a fresh dict per uplink was the largest single cost left on the event
loop (~4 µs of ~48). What never changes for a device type (field names and units) or a
gateway (tenant, gateway id) is rendered once with `json.dumps`; per uplink only strings
are escaped (json's own C escaper), and numbers and timestamps formatted. The bytes are
the same as `json.dumps(message, separators=(",", ":"))` (tests/test_message.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from json.encoder import encode_basestring_ascii as _string  # what json.dumps uses

from gateway.timefmt import rfc3339_ms


def _readings_parts(units: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """field -> ('"field":{"value":', ',"unit":"°C"}')"""
    return {name: (f'{_string(name)}:{{"value":', f',"unit":{_string(unit)}}}')
            for name, unit in units.items()}


class MessageFormat:
    """Encodes uplink messages for one tenant and gateway and a set of device types."""

    def __init__(self, tenant: str, gateway_id: str, units: Mapping[str, Mapping[str, str]]
                 ) -> None:
        self._gateway = f',"tenant":{_string(tenant)},"gateway_id":{_string(gateway_id)},"seq":'
        self._readings = {device_type: _readings_parts(u) for device_type, u in units.items()}

    def encode(self, device_id: str, device_type: str, seq: int | None, received_at: float,
               device_time: float | None, values: Mapping[str, float], transport: str,
               resources: Mapping[str, object] | None = None) -> bytes:
        parts = ['{"device_id":', _string(device_id), ',"device_type":', _string(device_type),
                 self._gateway, "null" if seq is None else str(seq),
                 ',"received_at":"', rfc3339_ms(received_at), '"']
        if device_time is not None:
            parts += ',"device_time":"', rfc3339_ms(device_time), '"'
        parts.append(',"readings":{')
        readings = self._readings[device_type]
        first = True
        for name, value in values.items():
            before, after = readings[name]
            if not first:
                parts.append(",")
            first = False
            parts += before, repr(value), after  # floats and ints as json writes them
        parts += '},"transport":', _string(transport)
        if resources:  # LwM2M resources no field maps: kept, as the device sent them
            parts += ',"resources":', json.dumps(resources, separators=(",", ":"))
        parts.append("}")
        return "".join(parts).encode()


def reference_encoding(device_id: str, device_type: str, tenant: str, gateway_id: str,
                       seq: int | None, received_at: float, device_time: float | None,
                       values: Mapping[str, float], units: Mapping[str, str],
                       transport: str, resources: Mapping[str, object] | None = None) -> bytes:
    """The same message through json.dumps: the format's definition, used by the tests."""
    message: dict[str, object] = {"device_id": device_id, "device_type": device_type,
                                  "tenant": tenant, "gateway_id": gateway_id, "seq": seq,
                                  "received_at": rfc3339_ms(received_at)}
    if device_time is not None:
        message["device_time"] = rfc3339_ms(device_time)
    message["readings"] = {name: {"value": v, "unit": units[name]} for name, v in values.items()}
    message["transport"] = transport
    if resources:
        message["resources"] = dict(resources)
    return json.dumps(message, separators=(",", ":")).encode()
