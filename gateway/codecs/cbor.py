"""Content-Format 60 (application/cbor): a flat CBOR map."""

from __future__ import annotations

from typing import Any

import cbor2

from gateway.codecs.base import Decoded, DecodeError, require_flat_map


def loads(payload: bytes, what: str) -> Any:
    try:
        return cbor2.loads(payload)
    except Exception as e:
        raise DecodeError(f"invalid {what}: {type(e).__name__}") from None


def decode(payload: bytes) -> Decoded:
    return require_flat_map(loads(payload, "CBOR"), "CBOR")
