"""Content-Format 50 (application/json): a flat JSON object."""

from __future__ import annotations

import json

from gateway.pipeline.codecs.base import Decoded, DecodeError, require_flat_map


def decode(payload: bytes) -> Decoded:
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise DecodeError(f"invalid JSON: {str(e)[:60]}") from None
    return require_flat_map(value, "JSON")
