"""LwM2M paths: "/3303/0/5700" <-> (3303, 0, 5700), at most four ids of 0..65535 each.

A path is a plain tuple of ints: object, instance, resource, resource instance; "/" is the
root, the empty tuple. This module only parses and renders; it never looks a path up.
"""

from __future__ import annotations

import re

LwM2mPath = tuple[int, ...]
ROOT: LwM2mPath = ()
MAX_DEPTH = 4
MAX_ID = 65535
_PATH = re.compile(r"(?:/[0-9]+)+")
_LONGEST_ID = len(str(MAX_ID))


class PathError(ValueError):
    """Not an LwM2M path; `detail` is short and safe to show an operator."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def parse_path(text: str) -> LwM2mPath:
    """"/3/0/7/1" -> (3, 0, 7, 1); "/" -> (). No trailing slash, no empty or signed ids."""
    if text == "/":
        return ROOT
    if not _PATH.fullmatch(text):
        raise PathError(f"not an LwM2M path: {text[:40]!r}")
    parts = text[1:].split("/")
    if len(parts) > MAX_DEPTH:
        raise PathError(f"{text[:40]} has {len(parts)} levels, an LwM2M path at most {MAX_DEPTH}")
    ids = []
    for part in parts:
        digits = part.lstrip("0") or "0"  # int() refuses thousands of digits: look at the length first
        if len(digits) > _LONGEST_ID or int(digits) > MAX_ID:
            raise PathError(f"id {part[:12]} in {text[:40]} is over {MAX_ID}")
        ids.append(int(digits))
    return tuple(ids)


def check_path(path: LwM2mPath) -> LwM2mPath:
    """`path` itself when every id is in 0..65535 and there are at most four of them."""
    if len(path) > MAX_DEPTH:
        raise PathError(f"an LwM2M path has at most {MAX_DEPTH} levels, not {len(path)}")
    for level, part in enumerate(path, 1):
        if isinstance(part, bool) or not isinstance(part, int) or not 0 <= part <= MAX_ID:
            raise PathError(f"the id at level {level} is not an integer in 0..{MAX_ID}")
    return path


def render_path(path: LwM2mPath) -> str:
    """(3303, 0, 5700) -> "/3303/0/5700"; () -> "/"."""
    check_path(path)
    return "/" + "/".join(str(part) for part in path)


def is_under(path: LwM2mPath, prefix: LwM2mPath) -> bool:
    """True when `path` is `prefix` or lies below it."""
    return path[: len(prefix)] == prefix
