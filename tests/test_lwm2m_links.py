"""Registration object links (RFC 6690 as LwM2M uses it): what lwm2m-node-lib and 1.1
clients send, every refusal with its detail, and fuzzing that only LinkError comes out."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.ingest.lwm2m.links import MAX_LINKS, LinkError, ObjectInfo, ObjectLinks, parse_object_links

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def info(*instances: int, version: str | None = None) -> ObjectInfo:
    return ObjectInfo(version, frozenset(instances))


def error_of(payload: bytes) -> str:
    with pytest.raises(LinkError) as caught:
        parse_object_links(payload)
    return caught.value.detail


def test_lwm2m_node_lib_single_object() -> None:
    assert parse_object_links(b"</3303/0>") == ObjectLinks("/", {3303: info(0)}, frozenset())


def test_lwm2m_node_lib_several_objects() -> None:
    assert parse_object_links(b"</1/0>,</3/0>") == ObjectLinks("/", {1: info(0), 3: info(0)}, frozenset())


def test_a_1_1_client_with_root_versions_and_content_formats() -> None:
    links = parse_object_links(b'</>;rt="oma.lwm2m";ct=11543,</1>;ver=1.1,</1/0>,</3/0>,</3303/0>;ver=1.1')

    assert links == ObjectLinks("/", {1: info(0, version="1.1"), 3: info(0), 3303: info(0)},
                                frozenset({11543}))


def test_the_core_link_value_in_leshans_object_3442_test() -> None:
    # eclipse-leshan/leshan LwM2mNodeDecoderTest ENCODED_OBJ3442: a Register payload as a resource value
    payload = (b'</>;rt="oma.lwm2m";ct="60 110 112 1542 1543 11542 11543",'
               b'</1>;ver=1.1,</1/0>,</2>,</3>;ver=1.1,</3/0>,</3442/0>')

    links = parse_object_links(payload)

    assert links.ct == frozenset({60, 110, 112, 1542, 1543, 11542, 11543})
    assert links.objects == {1: info(0, version="1.1"), 2: info(), 3: info(0, version="1.1"), 3442: info(0)}


def test_an_alternate_root_path_is_stripped_from_every_link() -> None:
    payload = b'</lwm2m>;rt="oma.lwm2m";ct=110,</lwm2m/1/0>,</lwm2m/3303/0>,</lwm2m/3303/1>'

    assert parse_object_links(payload) == ObjectLinks(
        "/lwm2m", {1: info(0), 3303: info(0, 1)}, frozenset({110}))


def test_whitespace_newlines_and_unquoted_values_between_links() -> None:
    payload = b' </>;rt=oma.lwm2m ; ct="60  110" ,\r\n  </3303> ;ver="1.1",\n</3303/0>,\t</3303/2> \n'

    assert parse_object_links(payload) == ObjectLinks("/", {3303: info(0, 2, version="1.1")},
                                                      frozenset({60, 110}))


def test_attributes_without_values_escapes_and_unknown_attributes_are_read_past() -> None:
    payload = b'</3303/0>;obs;title="a \\"quoted\\", ; value";ver=2.0,</1/0>'

    assert parse_object_links(payload).objects == {3303: info(0), 1: info(0)}


def test_the_root_link_may_come_last_and_an_empty_payload_is_no_objects() -> None:
    assert parse_object_links(b'</a/3/0>,</a>;rt="oma.lwm2m"').objects == {3: info(0)}
    assert parse_object_links(b"") == ObjectLinks("/", {}, frozenset())
    assert parse_object_links(b"</3/0>,").objects == {3: info(0)}


@pytest.mark.parametrize(("payload", "detail"), [
    (b"3303/0", "malformed link at position 0: expected <uri>"),
    (b"</3303/0", "malformed link at position 0: expected <uri>"),
    (b"</1/0> </3/0>", "malformed link at position 7: expected ',' or ';'"),
    (b"</1/0>;=1", "malformed link attribute at position 7"),
    (b'</1/0>;ver="1.1', "unterminated quoted value at position 11"),
    (b"</1/0>;ver=,</3/0>", "malformed value of attribute 'ver' at position 11"),
    (b"</3/0/1>", "link /3/0/1 at position 0 is deeper than /object/instance"),
    (b"</1/0>,</70000/0>", "link at position 7: id 70000 in /70000/0 is over 65535"),
    (b"</1/0>,</3/x>", "link at position 7: not an LwM2M path: '/3/x'"),
    (b"</lwm2m>;rt=\"oma.lwm2m\",</3/0>", "link '/3/0' at position 24 is not under the root /lwm2m"),
    (b'</>;rt="oma.lwm2m",</a>;rt="oma.lwm2m"', 'more than one link with rt="oma.lwm2m"'),
    (b'<coap://x/>;rt="oma.lwm2m"', "the root link 'coap://x/' is not an absolute path"),
    (b'</>;rt="oma.lwm2m";ct="110 json"', "ct='110 json' is not a list of content formats"),
    (b'</>;rt="oma.lwm2m";ct=70000', "ct='70000' is not a list of content formats"),
    (b'</>;rt="oma.lwm2m";ct=""', "ct='' is not a list of content formats"),
    (b"</1/0>,</\xff>", "links are not UTF-8 at byte 9"),
    (b"</1/0>," * 1200, "link payload of 8400 bytes is over the 8192-byte limit"),
    (b"</1>," * (MAX_LINKS + 1), "more than 1000 links"),
])
def test_malformed_links_are_refused_with_a_detail(payload: bytes, detail: str) -> None:
    assert error_of(payload) == detail


def test_a_thousand_links_are_read() -> None:
    assert len(parse_object_links(b",".join(b"</%d>" % i for i in range(MAX_LINKS))).objects) == MAX_LINKS


def parses_or_refuses(payload: bytes) -> None:
    try:
        links = parse_object_links(payload)
    except LinkError as e:
        assert e.detail and len(e.detail) < 200
        return
    assert links.root.startswith("/")
    for oid, found in links.objects.items():
        assert 0 <= oid <= 65535 and all(0 <= i <= 65535 for i in found.instances)


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_link_error(payload: bytes) -> None:
    parses_or_refuses(payload)


link_parts = st.sampled_from(['</>', '</lwm2m>', '</3/0>', '</1>', '</3303/0/1>', '</70000>', '</lwm2m/3/0>',
                              '<', '>', ',', ';', 'rt="oma.lwm2m"', 'rt=oma.lwm2m', 'ct=110', 'ct="60 110"',
                              'ver=1.1', '"', '\\', ' ', '\n', '=', 'obs'])


@FUZZ
@given(st.lists(link_parts, max_size=30).map("".join))
def test_near_valid_links_only_raise_link_error(text: str) -> None:
    parses_or_refuses(text.encode())
