"""The CoAP socket's transport (gateway/ingest/coap/udp.py): datagrams read in batches, each batch
stamped with the time its first datagram was noticed, none lost past a full batch, and
replies sent from the same socket."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import pytest

from gateway.ingest.coap.udp import (
    MAX_BATCH,
    Address,
    GatheringUdpTransport,
    Received,
    Together,
    serve_udp,
    wait_s,
)
from gateway.ingest.coap.udp import gather_s as gather_for_linger


class Batches:
    def __init__(self) -> None:
        self.batches: list[tuple[list[tuple[bytes, Address]], Received]] = []
        self.transport: GatheringUdpTransport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, GatheringUdpTransport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)

    def error_received(self, exc: Exception) -> None:
        raise AssertionError(f"unexpected socket error: {exc}")

    def datagrams_received(self, datagrams: list[tuple[bytes, Address]],
                           received: Received) -> None:
        self.batches.append((datagrams, received))

    def datagrams(self) -> list[bytes]:
        return [data for batch, _ in self.batches for data, _ in batch]


def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def until(condition: object, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def burst(gather_s: float, count: int, together: Together | None = None,
                sink: Batches | None = None) -> Batches:
    """`count` datagrams, all waiting in the socket before it is served, read to the end."""
    server, client = bound_socket(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = [f"datagram {i}".encode() for i in range(count)]
    for data in sent:
        client.sendto(data, server.getsockname())
    sink = sink or Batches()
    transport = serve_udp(server, sink, gather_s, together)
    try:
        await until(lambda: len(sink.datagrams()) == len(sent))
        assert sink.datagrams() == sent
    finally:
        transport.close()
        client.close()
    assert await sink.lost is None
    assert server.fileno() == -1
    return sink


async def test_a_gathered_burst_is_read_in_one_piece_under_one_stamp() -> None:
    sink = await burst(gather_s=0.002, count=2 * MAX_BATCH + 7)

    # One batch, one commit: every datagram counts from when the first was noticed.
    assert [len(batch) for batch, _ in sink.batches] == [2 * MAX_BATCH + 7]


async def test_a_gathered_batch_is_handled_inside_one_together_scope() -> None:
    scopes: list[int] = []  # datagrams handled so far, at each scope's end
    handled: list[int] = []

    @contextlib.contextmanager
    def together() -> Iterator[None]:
        yield
        scopes.append(sum(handled))

    class Counting(Batches):
        def datagrams_received(self, datagrams: list[tuple[bytes, Address]],
                               received: Received) -> None:
            handled.append(len(datagrams))
            super().datagrams_received(datagrams, received)

    await burst(gather_s=0.002, count=MAX_BATCH + 3, together=together, sink=Counting())

    assert scopes == [MAX_BATCH + 3]


async def test_a_busy_socket_is_read_a_batch_per_loop_turn_each_stamped_when_read() -> None:
    sink = await burst(gather_s=0.0, count=2 * MAX_BATCH + 7)

    assert [len(batch) for batch, _ in sink.batches] == [MAX_BATCH, MAX_BATCH, 7]
    stamps = [received for _, received in sink.batches]
    assert stamps == sorted(stamps) and len(set(stamps)) == 3


async def test_replies_leave_from_the_served_socket() -> None:
    server, client = bound_socket(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    sink = Batches()
    transport = serve_udp(server, sink, gather_s=0.0)
    try:
        client.sendto(b"ping", server.getsockname())
        await until(lambda: sink.datagrams() == [b"ping"])
        (((_, addr),), _) = sink.batches[0]

        transport.sendto(b"pong", addr)

        assert await asyncio.to_thread(client.recvfrom, 100) == (b"pong", server.getsockname())
    finally:
        transport.close()
        client.close()


def test_the_wait_before_reading_is_the_commit_linger_and_never_long() -> None:
    assert gather_for_linger(0.0) == 0.0  # no linger: read at once, as before
    assert gather_for_linger(0.030) == 0.030
    assert gather_for_linger(1.0) <= 0.050


def test_the_wait_gathers_about_20_datagrams_at_the_current_rate() -> None:
    assert wait_s(0.030, 0.0) == 0.030  # nothing measured yet: the whole linger
    assert wait_s(0.030, 500.0) == 0.030  # 20 datagrams take longer than the linger
    assert wait_s(0.030, 4000.0) == pytest.approx(0.005)
