"""Fuzzing the running gateway over UDP: arbitrary datagrams, and valid requests with
arbitrary options and payloads in every Content-Format, must never crash it, never log an
internal error and never stop it answering.

The default run is a smoke (FUZZ_EXAMPLES, default 400 per test); a long run:
    FUZZ_EXAMPLES=100000 .venv/bin/pytest tests/test_fuzz.py -q
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import aiocoap
import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.coap_raw import RawCoap, uplink_request
from tests.conftest import DEVICES, Gateway

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
TH = DEVICES[0]

options = st.lists(st.tuples(st.integers(0, 2100), st.binary(max_size=20)), max_size=6)
content_formats = st.sampled_from([None, 0, 50, 60, 110, 112, 65535])
values = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
                      lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                      max_leaves=12)


def encoded(value: Any, as_json: bool) -> bytes:
    """JSON or CBOR that decodes, whatever the Content-Format option says: the decoders and
    the schema see data, not only garbage (tests/test_fuzz_uplinks.py goes further)."""
    return json.dumps(value).encode() if as_json else bytes(cbor2.dumps(value))


payloads = st.one_of(st.binary(max_size=300), st.builds(encoded, values, st.booleans()))


@pytest.fixture
def udp(gateway: Gateway) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def assert_still_serving(gateway: Gateway, seq: int) -> None:
    with RawCoap(gateway.coap_port) as device:
        reply = device.exchange(uplink_request(gateway.uri(TH), {"seq": seq, "temperature": 1}))
    assert reply.code == aiocoap.CHANGED
    assert gateway.proc is not None and gateway.proc.poll() is None
    log = gateway.log_path.read_text()
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]


def test_arbitrary_datagrams_never_stop_the_gateway(gateway: Gateway, udp: socket.socket) -> None:
    @FUZZ
    @given(st.binary(max_size=600))
    def send(datagram: bytes) -> None:
        udp.sendto(datagram, ("127.0.0.1", gateway.coap_port))

    send()

    assert_still_serving(gateway, seq=1)


def test_arbitrary_requests_never_stop_the_gateway(gateway: Gateway, udp: socket.socket) -> None:
    @FUZZ
    @given(mtype=st.integers(0, 3), code=st.integers(0, 255), token=st.binary(max_size=8),
           extra=options, content_format=content_formats, payload=payloads,
           path=st.sampled_from([TH.device_id, "nobody", ""]))
    def send(mtype: int, code: int, token: bytes, extra: list[tuple[int, bytes]],
             content_format: int | None, payload: bytes, path: str) -> None:
        request = uplink_request(gateway.uri(path or TH, TH.token), b"",
                                 content_format=content_format, token=token)
        request.mtype, request.code = aiocoap.Type(mtype), aiocoap.Code(code)
        datagram = bytearray(request.encode())
        for delta, value in extra:  # raw options after the valid ones: any number, any value
            datagram += bytes((0xD0 | min(len(value), 12), delta % 256)) + value[:12]
        if payload:
            datagram += b"\xff" + payload
        udp.sendto(bytes(datagram), ("127.0.0.1", gateway.coap_port))

    send()

    assert_still_serving(gateway, seq=1_000_000)
