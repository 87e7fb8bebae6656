"""LwM2M commands as they arrive on MQTT (JSON), turned into CoAP requests to the device,
and the device's answer turned into the result published with the command's state.

A command is `{"id": "c1", "ttl_s": 3600, "op": "write", "path": "/1/0/3", "value": 30}`;
`op` takes EMQX's `msgType` names (read, discover, write, write-attr, execute, observe,
cancel-observe) so a user moving from EMQX keeps the vocabulary, on our own topic and with
our own `id`, `ttl_s` and states. Pure: no I/O, no state.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.ingest.coap import numbers as C
from gateway.ingest.coap import wire
from gateway.ingest.lwm2m import content
from gateway.ingest.lwm2m.paths import LwM2mPath, PathError, parse_path, render_path

OPS = ("read", "discover", "write", "write-attr", "execute", "observe", "cancel-observe")
ATTRIBUTES = ("pmin", "pmax", "gt", "lt", "st", "epmin", "epmax")
FORMATS = {"text": content.TEXT, "opaque": content.OPAQUE, "tlv": content.TLV,
           "senml-json": content.SENML_JSON, "senml-cbor": content.SENML_CBOR,
           "lwm2m-cbor": content.LWM2M_CBOR}


class BadCommand(ValueError):
    pass


@dataclass(slots=True, frozen=True)
class Request:
    op: str
    path: LwM2mPath
    code: int
    options: list[tuple[int, bytes]]
    payload: bytes = b""


def check(body: Mapping[str, object]) -> str | None:
    """Why `body` is no LwM2M command we can send, or None. A command without `op` is not
    an LwM2M one (it rides in the reply to a plain `/up` uplink) and passes."""
    if "op" not in body:
        return None
    try:
        build(body, "1.1")
    except BadCommand as e:
        return str(e)
    return None


def build(body: Mapping[str, object], version: str) -> Request:
    """The CoAP request for a command to a device speaking LwM2M `version`."""
    op = body.get("op")
    if op not in OPS:
        raise BadCommand(f"op must be one of {', '.join(OPS)}")
    raw_path = body.get("path")
    if not isinstance(raw_path, str):
        raise BadCommand("needs a \"path\" such as \"/3303/0/5700\"")
    try:
        path = parse_path(raw_path)
    except PathError as e:
        raise BadCommand(f"path: {e.detail}") from None
    if not path:
        raise BadCommand("path must name an object, an instance or a resource, not /")
    options = [(C.URI_PATH, str(part).encode()) for part in path]
    if op == "read":
        return Request(op, path, C.GET, options)
    if op == "discover":
        return Request(op, path, C.GET, [*options, (C.ACCEPT, wire.uint_value(content.LINK))])
    if op == "observe":
        return Request(op, path, C.GET, [(C.OBSERVE, b""), *options])
    if op == "cancel-observe":
        return Request(op, path, C.GET, [(C.OBSERVE, wire.uint_value(1)), *options])
    if op == "execute":
        args = body.get("args", "")
        if not isinstance(args, str) or len(path) != 3:
            raise BadCommand("execute needs a resource path and \"args\" as a string, if any")
        return Request(op, path, C.POST, options, args.encode())
    if op == "write-attr":
        attributes = body.get("attributes")
        if not isinstance(attributes, dict) or not attributes:
            raise BadCommand("write-attr needs \"attributes\", e.g. {\"pmin\": 10, \"pmax\": 60}")
        queries = []
        for name, value in attributes.items():
            if name not in ATTRIBUTES:
                raise BadCommand(f"attribute {name!r} is not one of {', '.join(ATTRIBUTES)}")
            if value is None:
                queries.append(name)  # removes the attribute
            elif isinstance(value, int | float) and not isinstance(value, bool):
                queries.append(f"{name}={value:g}")
            else:
                raise BadCommand(f"attribute {name} must be a number (or null to remove it)")
        return Request(op, path, C.PUT, [*options, *((C.URI_QUERY, q.encode()) for q in queries)])
    return _write(body, path, options, version)


def _write(body: Mapping[str, object], path: LwM2mPath, options: list[tuple[int, bytes]],
           version: str) -> Request:
    values: dict[LwM2mPath, content.WriteValue] = {}
    if "value" in body:
        if len(path) < 3:
            raise BadCommand("a \"value\" is written to a resource path; use \"values\" for an "
                             "instance")
        values[path] = _write_value(body["value"], render_path(path))
    raw_values = body.get("values")
    if isinstance(raw_values, dict):
        for key, value in raw_values.items():
            try:
                values[parse_path(key)] = _write_value(value, key)
            except PathError as e:
                raise BadCommand(f"values: {e.detail}") from None
    elif raw_values is not None:
        raise BadCommand("\"values\" must map resource paths to values")
    if not values:
        raise BadCommand("write needs a \"value\" (or \"values\": {path: value})")
    fmt = body.get("format")
    if fmt is None:
        if len(values) == 1 and path in values:
            cf = content.TEXT
        else:
            cf = content.TLV if version == "1.0" else content.SENML_JSON
    elif fmt in FORMATS:
        cf = FORMATS[fmt]
    else:
        raise BadCommand(f"format must be one of {', '.join(FORMATS)}")
    try:
        payload = content.encode(values, cf, path)
    except content.ContentError as e:
        raise BadCommand(f"write: {e.detail}") from None
    # A resource is replaced (PUT); an instance is updated in part (POST), LwM2M 1.1 5.4.3.
    code = C.PUT if len(path) >= 3 else C.POST
    return Request("write", path, code, [*options, (C.CONTENT_FORMAT, wire.uint_value(cf))],
                   payload)


def _write_value(value: object, where: str) -> content.WriteValue:
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict) and isinstance(value.get("base64"), str):
        try:
            return base64.b64decode(value["base64"], validate=True)
        except ValueError:
            raise BadCommand(f"{where}: base64 is not valid") from None
    raise BadCommand(f"{where}: a value is a number, a string, a boolean or {{\"base64\": ...}}")


def result(request: Request, response: wire.Message, now: float) -> dict[str, object]:
    """What the device answered, for the command's `confirmed` state: its code, and for a
    read the values (`content`), for a discover its links (`links`)."""
    out: dict[str, object] = {"code": C.code_str(response.code)}
    if response.code >> 5 != 2:
        if response.payload:
            out["diagnostic"] = response.payload[:200].decode("utf-8", "replace")
        return out
    if request.op == "discover":
        out["links"] = response.payload[:2000].decode("utf-8", "replace")
        return out
    if not response.payload or request.op not in ("read", "observe"):
        return out
    cf_option = response.option(C.CONTENT_FORMAT)
    cf = wire.uint_of(cf_option) if cf_option is not None else content.TEXT
    try:
        readings = content.decode(response.payload, cf, request.path, now)
    except content.ContentError as e:
        out["error"] = f"could not read content format {cf}: {e.detail}"
        return out
    out["content"] = [{"path": render_path(r.path), **jsonable(r.value)} for r in readings]
    return out


def jsonable(value: content.Value) -> dict[str, object]:
    """A value for a JSON message: `value` for numbers, text and booleans; TLV bytes whose
    type the wire does not say as `tlv` (hex), opaque bytes as `base64`."""
    if isinstance(value, content.Raw):
        return {"tlv": bytes(value).hex()}
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    return {"value": value}
