"""The simulator's source endpoints on real loopback sockets: devices on shared ports send
from their own addresses and get only their own replies; a rebind moves to another port;
and a whole exchange over a shared port looks to the gateway as over a socket of its own."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator

import pytest

from gateway.ingest.coap import numbers as C
from gateway.ingest.coap import wire
from gateway.tools.sim.endpoints import SharedPorts
from gateway.tools.sim.exchange import Exchange, Link, Outcome, build_request
from gateway.tools.sim.radio import Coverage, Radio
from gateway.tools.sim.retransmit import TransmissionParameters
from tests.test_sim_retransmit import poll as until


class Echo(asyncio.DatagramProtocol):
    """Answers each datagram with b"to " + the address it came from; notes the sources."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.sources: list[tuple[str, int]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sources.append(addr)
        reply = self.answer(data, addr)
        if reply is not None:
            assert self.transport is not None
            self.transport.sendto(reply, addr)

    def answer(self, data: bytes, addr: tuple[str, int]) -> bytes | None:
        return b"to " + addr[0].encode()


@pytest.fixture
async def echo() -> AsyncIterator[tuple[Echo, tuple[str, int]]]:
    transport, server = await asyncio.get_running_loop().create_datagram_endpoint(
        Echo, local_addr=("127.0.0.1", 0))
    yield server, transport.get_extra_info("sockname")
    transport.close()


@pytest.fixture
async def shared(echo: tuple[Echo, tuple[str, int]]) -> AsyncIterator[tuple[Echo, SharedPorts]]:
    """Three shared ports to the echo server (four devices: two share one)."""
    server, target = echo
    ports = SharedPorts(3, target)
    yield server, ports
    ports.close()


async def test_devices_on_one_shared_port_send_from_their_own_addresses_and_get_their_own_replies(
    shared: tuple[Echo, SharedPorts],
) -> None:
    server, ports = shared
    addresses = [f"127.1.0.{i}" for i in range(1, 5)]
    got: dict[str, list[bytes]] = {ip: [] for ip in addresses}
    endpoints = [ports.open(ip, got[ip].append) for ip in addresses]
    for endpoint in endpoints:
        endpoint.send(b"x")
    await until(lambda: all(got.values()))

    assert got == {ip: [b"to " + ip.encode()] for ip in addresses}
    assert sorted(server.sources) == sorted(
        (ip, endpoint.port) for ip, endpoint in zip(addresses, endpoints, strict=True))
    assert len({endpoint.port for endpoint in endpoints}) == 3


async def test_a_rebind_gets_another_port_and_a_closed_endpoint_hears_nothing(
    shared: tuple[Echo, SharedPorts],
) -> None:
    server, ports = shared
    old_got: list[bytes] = []
    new_got: list[bytes] = []
    old = ports.open("127.1.0.7", old_got.append)
    new = ports.open("127.1.0.7", new_got.append)  # a rebind: opened before old closes
    assert new.port != old.port
    old.send(b"late")
    old.close()
    old.send(b"after close")  # sends nothing
    new.send(b"now")
    await until(lambda: len(new_got) == 1 and len(server.sources) == 2)
    await asyncio.sleep(0.05)

    assert old_got == []  # its reply arrived after it closed: dropped
    assert [port for _, port in server.sources] == [old.port, new.port]
    # A second rebind never returns to the port the first one left, though it is free
    # and next in turn (another device's wake moved the turn on to it).
    ports.open("127.1.0.99", lambda data: None)
    assert ports.open("127.1.0.7", new_got.append).port not in (old.port, new.port)


async def test_each_wake_of_a_device_has_a_port_other_than_its_last_two(
    shared: tuple[Echo, SharedPorts],
) -> None:
    _, ports = shared
    seen = []
    for wake in range(12):
        if wake % 2:  # another device's wake in between moves the turn on
            ports.open("127.1.0.99", lambda data: None).close()
        endpoint = ports.open("127.1.0.8", lambda data: None)
        seen.append(endpoint.port)
        endpoint.close()

    assert all(port not in seen[i - 2:i] for i, port in enumerate(seen) if i >= 2)
    assert seen[1] != seen[0]
    for _ in range(3):
        ports.open("127.1.0.5", lambda data: None)  # all three ports carry it now
    with pytest.raises(OSError, match=r"all 3 shared ports carry 127\.1\.0\.5"):
        ports.open("127.1.0.5", lambda data: None)


async def test_a_datagram_from_anyone_but_the_gateway_is_ignored(
    shared: tuple[Echo, SharedPorts],
) -> None:
    _, ports = shared
    got: list[bytes] = []
    endpoint = ports.open("127.1.0.9", got.append)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.sendto(b"spoof", ("127.1.0.9", endpoint.port))
    endpoint.send(b"hello")
    await until(lambda: len(got) == 1)
    await asyncio.sleep(0.05)

    assert got == [b"to 127.1.0.9"]


class ChangedOnSecondTry(Echo):
    """Ignores the first request, answers the retransmission with a piggybacked 2.04."""

    def answer(self, data: bytes, addr: tuple[str, int]) -> bytes | None:
        if len(self.sources) == 1:
            return None
        msg = wire.decode(data)
        return wire.encode_ack(C.CHANGED, msg.mid, msg.token)


async def test_an_exchange_over_shared_ports_rebinds_to_a_new_port_from_its_own_address() -> None:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(ChangedOnSecondTry,
                                                            local_addr=("127.0.0.1", 0))
    target = transport.get_extra_info("sockname")
    ports = SharedPorts(4, target)
    rng = random.Random(3)
    link = Link(loop, target, socket.AF_INET, Radio(rng, latency_scale=0.0), rng,
                TransmissionParameters(ack_timeout_s=0.1), nat_idle_timeout_s=3600.0,
                nat_rebind_probability=1.0, shared_ports=ports)
    done: asyncio.Future[Exchange] = loop.create_future()
    exchange = Exchange(link, source_ip="127.1.2.3", coverage=Coverage.CE0, mid=5, token=b"t",
                        request=build_request(5, b"t", "th-00001", "k", 50, b'{"seq":1}'),
                        on_done=done.set_result)
    try:
        exchange.start()
        await asyncio.wait_for(done, 10)
    finally:
        transport.close()
        ports.close()

    assert exchange.outcome is Outcome.ACKED
    assert exchange.rebinds == 1
    assert [ip for ip, _ in server.sources] == ["127.1.2.3", "127.1.2.3"]
    assert server.sources[0][1] != server.sources[1][1]
    assert exchange.source_port is None  # closed with the exchange
