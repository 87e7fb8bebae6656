"""Shared types of the payload decoders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class DecodeError(Exception):
    """The payload cannot be read in its Content-Format; `detail` is short and safe to send."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(slots=True)
class Decoded:
    fields: dict[str, Any]
    units: dict[str, str] = field(default_factory=dict)


def require_flat_map(value: object, what: str) -> Decoded:
    if not isinstance(value, dict):
        raise DecodeError(f"{what}: expected a map of field -> value")
    for key in value:
        if not isinstance(key, str):
            raise DecodeError(f"{what}: map keys must be text")
    return Decoded(value)
