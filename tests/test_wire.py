"""Property tests of our CoAP wire codec against aiocoap's, the reference implementation."""

from __future__ import annotations

import aiocoap
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.numbers.types import Type
from aiocoap.optiontypes import BlockOption, OpaqueOption
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ingest.coap import numbers as C
from gateway.ingest.coap import wire

PROPERTY = settings(max_examples=300, deadline=None)
KNOWN_OPTIONS = frozenset(int(n) for n in OptionNumber)
# Option numbers aiocoap has no format for: it keeps their values as opaque bytes.
unknown_option_numbers = st.one_of(
    st.integers(0, 300), st.integers(300, 2000), st.integers(2000, 65535)
).filter(lambda n: n not in KNOWN_OPTIONS and n != 0)
uri_segment = st.text(max_size=20)
block = st.builds(BlockOption.BlockwiseTuple, st.integers(0, 2**20 - 1), st.booleans(),
                  st.integers(0, 6))


@st.composite
def aiocoap_messages(draw: st.DrawFn) -> aiocoap.Message:
    """Messages as aiocoap builds them: every type, request and response codes, typed and
    opaque options with 0- to 300-byte values (1- and 2-byte extended deltas and lengths)."""
    if draw(st.integers(0, 19)) == 0:
        message = aiocoap.Message(code=Code.EMPTY)  # empty: no token, options or payload
    else:
        message = aiocoap.Message(code=Code(draw(st.integers(1, 255))),
                                  payload=draw(st.binary(max_size=64)))
        message.token = draw(st.binary(max_size=8))
        message.opt.uri_path = draw(st.lists(uri_segment, max_size=4))
        message.opt.uri_query = draw(st.lists(uri_segment, max_size=3))
        if draw(st.booleans()):
            message.opt.content_format = draw(st.integers(0, 65535))
        if draw(st.booleans()):
            message.opt.block1 = draw(block)
        if draw(st.booleans()):
            message.opt.size1 = draw(st.integers(0, 2**32 - 1))
        for number, value in draw(st.lists(
                st.tuples(unknown_option_numbers, st.binary(max_size=300)), max_size=4)):
            message.opt.add_option(OpaqueOption(OptionNumber(number), value))
    message.mtype = Type(draw(st.integers(0, 3)))
    message.mid = draw(st.integers(0, 0xFFFF))
    return message


def as_tuple_theirs(message: aiocoap.Message) -> tuple[object, ...]:
    options = [(int(o.number), o.encode()) for o in message.opt.option_list()]
    return (int(message.mtype), int(message.code), message.mid, bytes(message.token), options,
            bytes(message.payload))


def as_tuple_ours(message: wire.Message) -> tuple[object, ...]:
    return (message.mtype, message.code, message.mid, message.token, message.options,
            message.payload)


@PROPERTY
@given(aiocoap_messages())
def test_decode_agrees_with_aiocoap_on_messages_aiocoap_encodes(message: aiocoap.Message) -> None:
    data = message.encode()

    assert as_tuple_ours(wire.decode(data)) == as_tuple_theirs(aiocoap.Message.decode(data))


@PROPERTY
@given(aiocoap_messages())
def test_encode_of_decode_gives_back_aiocoap_bytes(message: aiocoap.Message) -> None:
    data = message.encode()

    assert wire.encode(wire.decode(data)) == data


uint_options = st.sampled_from([int(OptionNumber.CONTENT_FORMAT), int(OptionNumber.MAX_AGE),
                                int(OptionNumber.SIZE1), int(OptionNumber.BLOCK1)])


@st.composite
def our_messages(draw: st.DrawFn) -> wire.Message:
    """Messages as the gateway builds its replies: uint options in shortest form, any others."""
    options = [(number, wire.uint_value(draw(st.integers(0, 2**24 - 1))))
               for number in draw(st.lists(uint_options, max_size=3))]
    options += draw(st.lists(st.tuples(unknown_option_numbers, st.binary(max_size=300)),
                             max_size=3))
    return wire.Message(draw(st.integers(0, 3)), draw(st.integers(1, 255)),
                        draw(st.integers(0, 0xFFFF)), draw(st.binary(max_size=8)),
                        sorted(options, key=lambda o: o[0]), draw(st.binary(max_size=64)))


@PROPERTY
@given(our_messages())
def test_aiocoap_decodes_our_encoding_to_the_same_message(message: wire.Message) -> None:
    assert as_tuple_theirs(aiocoap.Message.decode(wire.encode(message))) == as_tuple_ours(message)


# Mostly-plausible datagrams: a version-1 header with a short token, then anything.
coap_like_bytes = st.builds(
    lambda first, rest: bytes((0x40 | first,)) + rest, st.integers(0, 0x38), st.binary(max_size=80))


@PROPERTY
@given(st.one_of(st.binary(max_size=80), coap_like_bytes))
def test_arbitrary_bytes_raise_coap_format_error_or_round_trip(data: bytes) -> None:
    try:
        message = wire.decode(data)
    except wire.CoapFormatError:
        return
    # Every field of the wire format has one encoding, so what decodes re-encodes exactly.
    assert wire.encode(message) == data


@PROPERTY
@given(block)
def test_block_option_round_trips_with_aiocoap(value: BlockOption.BlockwiseTuple) -> None:
    message = aiocoap.Message(code=Code.POST)
    message.opt.block1 = value
    (encoded,) = [o.encode() for o in message.opt.option_list()]

    parsed = wire.Block.parse(encoded)

    assert (parsed.num, parsed.more, parsed.szx, parsed.size) == (
        value.block_number, value.more, value.size_exponent, value.size)
    assert parsed.encode() == encoded


@given(code=st.integers(0, 255), mid=st.integers(0, 0xFFFF), token=st.binary(max_size=8))
def test_encode_ack_is_encode_of_a_bare_ack(code: int, mid: int, token: bytes) -> None:
    assert wire.encode_ack(code, mid, token) == wire.encode(wire.Message(C.ACK, code, mid, token))
