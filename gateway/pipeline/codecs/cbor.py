"""Content-Format 60 (application/cbor): a flat CBOR map."""

from __future__ import annotations

import io
from typing import Any

import cbor2

from gateway.pipeline.codecs.base import Decoded, DecodeError, require_flat_map


def loads(payload: bytes, what: str) -> Any:
    """Exactly one CBOR data item; `cbor2.loads` alone would ignore bytes after it."""
    stream = io.BytesIO(payload)
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except Exception as e:
        raise DecodeError(f"invalid {what}: {type(e).__name__}") from None
    if stream.tell() != len(payload):
        raise DecodeError(f"invalid {what}: {len(payload) - stream.tell()} bytes after the data item")
    return value


def decode(payload: bytes) -> Decoded:
    return require_flat_map(loads(payload, "CBOR"), "CBOR")
