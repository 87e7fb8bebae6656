"""Payload decoders: bytes in a given Content-Format -> a flat report map.

A flat report is `{"seq": 17, "ts": 1763900000, "temperature": 21.5, ...}`; SenML also
carries units. Decoders never raise anything but DecodeError, whatever the bytes.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.pipeline.codecs import cbor, json, senml
from gateway.pipeline.codecs.base import Decoded, DecodeError

JSON = 50
CBOR = 60
SENML_JSON = 110
SENML_CBOR = 112
DEFAULT_CONTENT_FORMAT = JSON

DECODERS: dict[int, Callable[[bytes], Decoded]] = {
    JSON: json.decode,
    CBOR: cbor.decode,
    SENML_JSON: senml.decode_json,
    SENML_CBOR: senml.decode_cbor,
}

__all__ = ["CBOR", "DECODERS", "DEFAULT_CONTENT_FORMAT", "JSON", "SENML_CBOR", "SENML_JSON",
           "DecodeError", "Decoded"]
