"""The object links of an LwM2M Register/Update payload (CoRE Link Format, RFC 6690).

`parse_object_links` reads `</>;rt="oma.lwm2m";ct=110,</1>;ver=1.1,</3/0>` into the client's
root path, content formats and objects with their instances; it raises nothing but LinkError,
whatever the bytes. It never renders links and never judges which objects a client may have.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.ingest.lwm2m.paths import PathError, parse_path

MAX_PAYLOAD_BYTES = 8 * 1024
MAX_LINKS = 1000
LWM2M_RESOURCE_TYPE = "oma.lwm2m"

_SPACE = re.compile(r"[ \t\r\n]*")
_URI = re.compile(r"<([^<>\s]*)>")
# RFC 6690 §2: parmname (RFC 8288 token, with the extended "*" form) and ptoken.
_PARAM_NAME = re.compile(r"[A-Za-z0-9!#$&+.^_`|~-]+\*?")
_PTOKEN = re.compile(r"[!#$%&'()*+\-./0-9:<=>?@A-Z\[\]^_`a-z{|}~]+")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_ROOT_PATH = re.compile(r"/(?:[A-Za-z0-9._~-]+/)*(?:[A-Za-z0-9._~-]+)?")


class LinkError(ValueError):
    """A registration payload that is not LwM2M object links; `detail` is short and safe to
    show an operator."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What the client said of one object: its version (`ver=`, None when not given, which
    LwM2M reads as 1.0) and the instances it has."""

    version: str | None
    instances: frozenset[int]


@dataclass(frozen=True, slots=True)
class ObjectLinks:
    """`root`: the alternate path (rt="oma.lwm2m"), "/" by default; `ct`: the content formats
    the client advertised on that link, empty when it named none."""

    root: str
    objects: dict[int, ObjectInfo]
    ct: frozenset[int]


@dataclass(frozen=True, slots=True)
class _Link:
    uri: str
    params: dict[str, str | None]
    at: int  # byte offset, for error details (a character position)


def parse_object_links(payload: bytes) -> ObjectLinks:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise LinkError(f"link payload of {len(payload)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as e:
        raise LinkError(f"links are not UTF-8 at byte {e.start}") from None
    links = _split(text)
    root, ct = "/", frozenset[int]()
    root_links = [link for link in links if LWM2M_RESOURCE_TYPE in (link.params.get("rt") or "").split()]
    if len(root_links) > 1:
        raise LinkError(f'more than one link with rt="{LWM2M_RESOURCE_TYPE}"')
    if root_links:
        root = _root(root_links[0])
        ct = _content_formats(root_links[0].params.get("ct"))
    objects: dict[int, tuple[str | None, set[int]]] = {}
    for link in links:
        path = _object_path(link, root)
        if not path:
            continue
        version, instances = objects.setdefault(path[0], (None, set()))
        if len(path) == 2:
            instances.add(path[1])
        elif version is None and link.params.get("ver"):
            objects[path[0]] = (link.params["ver"], instances)
    return ObjectLinks(root, {oid: ObjectInfo(version, frozenset(instances))
                              for oid, (version, instances) in objects.items()}, ct)


def _split(text: str) -> list[_Link]:
    """link-value *( "," link-value ), whitespace allowed around the separators."""
    links: list[_Link] = []
    pos = _skip_space(text, 0)
    while pos < len(text):
        if len(links) >= MAX_LINKS:
            raise LinkError(f"more than {MAX_LINKS} links")
        at = pos
        uri = _URI.match(text, pos)
        if uri is None:
            raise LinkError(f"malformed link at position {pos}: expected <uri>")
        pos = _skip_space(text, uri.end())
        params: dict[str, str | None] = {}
        while pos < len(text) and text[pos] == ";":
            pos = _skip_space(text, pos + 1)
            name, value, pos = _param(text, pos)
            params.setdefault(name.lower(), value)  # RFC 6690 §4: the first occurrence counts
            pos = _skip_space(text, pos)
        links.append(_Link(uri.group(1), params, at))
        if pos < len(text):
            if text[pos] != ",":
                raise LinkError(f"malformed link at position {pos}: expected ',' or ';'")
            pos = _skip_space(text, pos + 1)
    return links


def _skip_space(text: str, pos: int) -> int:
    return _SPACE.match(text, pos).end()  # type: ignore[union-attr]  # "*" always matches


def _param(text: str, pos: int) -> tuple[str, str | None, int]:
    name = _PARAM_NAME.match(text, pos)
    if name is None:
        raise LinkError(f"malformed link attribute at position {pos}")
    pos = _skip_space(text, name.end())
    if pos >= len(text) or text[pos] != "=":
        return name.group(0), None, pos
    pos = _skip_space(text, pos + 1)
    quoted = _QUOTED.match(text, pos)
    if quoted is not None:
        return name.group(0), _ESCAPE.sub(r"\1", quoted.group(1)), quoted.end()
    if pos < len(text) and text[pos] == '"':
        raise LinkError(f"unterminated quoted value at position {pos}")
    token = _PTOKEN.match(text, pos)
    if token is None:
        raise LinkError(f"malformed value of attribute {name.group(0)[:20]!r} at position {pos}")
    return name.group(0), token.group(0), token.end()


def _root(link: _Link) -> str:
    if not _ROOT_PATH.fullmatch(link.uri):
        raise LinkError(f"the root link {link.uri[:40]!r} is not an absolute path")
    return link.uri.rstrip("/") or "/"


def _content_formats(value: str | None) -> frozenset[int]:
    if value is None:
        return frozenset()
    formats = value.split()
    if not formats or not all(re.fullmatch(r"[0-9]{1,5}", f) and int(f) <= 65535 for f in formats):
        raise LinkError(f"ct={value[:40]!r} is not a list of content formats")
    return frozenset(int(f) for f in formats)


def _object_path(link: _Link, root: str) -> tuple[int, ...]:
    """The link's /object or /object/instance below `root`; () for the root itself."""
    if LWM2M_RESOURCE_TYPE in (link.params.get("rt") or "").split():
        return ()
    uri = link.uri
    if root != "/":
        if uri.rstrip("/") == root:
            return ()
        if not uri.startswith(root + "/"):
            raise LinkError(f"link {uri[:40]!r} at position {link.at} is not under the root {root}")
        uri = uri[len(root):]
    try:
        path = parse_path(uri)
    except PathError as e:
        raise LinkError(f"link at position {link.at}: {e.detail}") from None
    if len(path) > 2:
        raise LinkError(f"link {uri[:40]} at position {link.at} is deeper than /object/instance")
    return path
