"""RFC 7252 CON retransmission in the simulator: the timer against a deterministic clock,
then one Exchange against a real UDP peer on loopback (short ACK_TIMEOUT, no waiting on
wall-clock figures)."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.config import load_config
from gateway.ingest.coap import numbers as C
from gateway.ingest.coap import wire
from gateway.pipeline.registry import Device
from gateway.tools.sim.exchange import Exchange, Link, Outcome, build_request
from gateway.tools.sim.fleet import Fleet, build_devices
from gateway.tools.sim.ledger import Ledger
from gateway.tools.sim.radio import Coverage, Radio
from gateway.tools.sim.retransmit import (
    RFC7252,
    RetransmissionTimer,
    TransmissionParameters,
    service_unavailable_wait_s,
)
from tests.conftest import ROOT


def fire_until_given_up(timer: RetransmissionTimer) -> list[float]:
    """Let the timer expire exactly at each deadline; the times it asked to retransmit,
    then the time it gave up."""
    times = []
    while True:
        now = timer.deadline
        if not timer.on_timeout(now):
            times.append(now)
            return times
        times.append(now)


def test_first_timeout_lies_between_ack_timeout_and_ack_timeout_times_random_factor() -> None:
    assert RetransmissionTimer(0.0, 0.0).timeout_s == 2.0
    assert RetransmissionTimer(0.0, 0.5).timeout_s == 2.5
    assert 2.0 < RetransmissionTimer(0.0, 0.999).timeout_s < 3.0


def test_timeout_doubles_at_each_retransmission_and_gives_up_after_the_fourth() -> None:
    timer = RetransmissionTimer(100.0, 0.5)  # first timeout 2.5 s

    times = fire_until_given_up(timer)

    # Retransmissions at +2.5, +7.5, +17.5, +37.5; give up at +77.5 (31 x 2.5 s).
    assert [t - 100.0 for t in times] == [2.5, 7.5, 17.5, 37.5, 77.5]
    assert timer.retransmissions == RFC7252.max_retransmit == 4


def test_timer_is_not_expired_before_its_deadline() -> None:
    timer = RetransmissionTimer(10.0, 0.0)

    assert not timer.expired(11.999)
    assert timer.expired(12.0)


@pytest.mark.parametrize("draw", [0.0, 0.37, 0.999])
def test_giving_up_never_takes_longer_than_max_transmit_wait(draw: float) -> None:
    timer = RetransmissionTimer(0.0, draw)

    gave_up_at = fire_until_given_up(timer)[-1]

    assert gave_up_at <= RFC7252.max_transmit_wait_s
    assert gave_up_at == pytest.approx(31 * RFC7252.initial_timeout_s(draw))


def test_transmission_parameters_give_the_rfc_7252_derived_times() -> None:
    assert RFC7252.max_transmit_span_s == 45.0
    assert RFC7252.max_transmit_wait_s == 93.0


def test_5_03_wait_is_its_max_age_or_60_s_without_one() -> None:
    assert service_unavailable_wait_s(30) == 30.0
    assert service_unavailable_wait_s(0) == 0.0
    assert service_unavailable_wait_s(None) == 60.0


# -- one exchange against a real UDP peer ---------------------------------------------------
class Peer(asyncio.DatagramProtocol):
    """A CoAP peer on loopback that answers 2.04 only from the Nth request on."""

    def __init__(self, answer_from: int) -> None:
        self.answer_from = answer_from
        self.received: list[tuple[wire.Message, tuple[str, int]]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        msg = wire.decode(data)
        self.received.append((msg, addr))
        if len(self.received) >= self.answer_from and self.transport is not None:
            reply = wire.Message(C.ACK, C.CHANGED, msg.mid, msg.token)
            self.transport.sendto(wire.encode(reply), addr)


@pytest.fixture
async def peer_factory() -> AsyncIterator[Callable[[int], Awaitable[tuple[Peer, int]]]]:
    transports: list[asyncio.BaseTransport] = []
    loop = asyncio.get_running_loop()

    async def make(answer_from: int) -> tuple[Peer, int]:
        transport, peer = await loop.create_datagram_endpoint(
            lambda: Peer(answer_from), local_addr=("127.0.0.1", 0))
        transports.append(transport)
        return peer, transport.get_extra_info("sockname")[1]

    yield make
    for t in transports:
        t.close()


def fast_link(port: int, rebind_probability: float = 0.0) -> Link:
    rng = random.Random(7)
    return Link(asyncio.get_running_loop(), ("127.0.0.1", port), socket.AF_INET,
                Radio(rng, latency_scale=0.0), rng,
                TransmissionParameters(ack_timeout_s=0.1, ack_random_factor=1.5, max_retransmit=4),
                nat_idle_timeout_s=3600.0, nat_rebind_probability=rebind_probability)


async def run_exchange(link: Link, mid: int = 0x1234, token: bytes = b"tok1") -> Exchange:
    done: asyncio.Future[Exchange] = asyncio.get_running_loop().create_future()
    request = build_request(mid, token, "th-00001", "secret", 50, b'{"seq":1,"temperature":21.5}')
    exchange = Exchange(link, source_ip="127.0.0.1", coverage=Coverage.CE0, mid=mid, token=token,
                        request=request, on_done=done.set_result)
    exchange.start()
    return await asyncio.wait_for(done, 30)


async def test_exchange_retransmits_with_the_same_message_id_until_acked(
    peer_factory: Callable[[int], Awaitable[tuple[Peer, int]]],
) -> None:
    peer, port = await peer_factory(3)

    exchange = await run_exchange(fast_link(port))

    assert exchange.outcome is Outcome.ACKED
    first_three = peer.received[:3]
    assert len(first_three) == 3
    assert {m.mid for m, _ in first_three} == {0x1234}
    assert {m.token for m, _ in first_three} == {b"tok1"}
    assert {m.mtype for m, _ in first_three} == {C.CON}
    assert exchange.retransmissions >= 2


async def test_exchange_gives_up_after_four_retransmissions(
    peer_factory: Callable[[int], Awaitable[tuple[Peer, int]]],
) -> None:
    peer, port = await peer_factory(1_000)

    exchange = await run_exchange(fast_link(port))

    assert exchange.outcome is Outcome.TIMEOUT
    assert exchange.transmissions == 5
    assert len(peer.received) == 5


async def test_exchange_closes_its_socket_when_done(
    peer_factory: Callable[[int], Awaitable[tuple[Peer, int]]],
) -> None:
    _, port = await peer_factory(1)

    exchange = await run_exchange(fast_link(port))

    assert exchange.outcome is Outcome.ACKED
    assert exchange.source_port is None


# -- 5.03 and 4.29 with Max-Age, through the fleet engine -----------------------------------
class Unavailable(asyncio.DatagramProtocol):
    """Answers every request `code` (5.03 or 4.29) with Max-Age `max_age_s`."""

    def __init__(self, code: int, max_age_s: int) -> None:
        self.code = code
        self.max_age_s = max_age_s
        self.payloads: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        msg = wire.decode(data)
        self.payloads.append(msg.payload)
        reply = wire.Message(C.ACK, self.code, msg.mid, msg.token,
                             [(C.MAX_AGE, wire.uint_value(self.max_age_s))], b"overloaded")
        assert self.transport is not None
        self.transport.sendto(wire.encode(reply), addr)


@pytest.mark.parametrize("code", [C.SERVICE_UNAVAILABLE, C.TOO_MANY_REQUESTS])
async def test_device_answered_5_03_or_4_29_sleeps_max_age_and_keeps_its_report(code: int) -> None:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        lambda: Unavailable(code, max_age_s=120), local_addr=("127.0.0.1", 0))
    settings = load_config(ROOT / "config" / "gateway.toml")
    sim = settings.sim.model_copy(update={
        "port": transport.get_extra_info("sockname")[1], "interval_s": 0.01, "latency_scale": 0.0,
        "loss_up": 0.0, "loss_down": 0.0, "faulty_share": 0.0})
    rng = random.Random(1)
    link = Link(loop, ("127.0.0.1", sim.port), socket.AF_INET, Radio(rng, latency_scale=0.0), rng,
                RFC7252, sim.nat_idle_timeout_s, 0.0)
    ledger = Ledger()
    devices = build_devices([Device("th-1", "env_th", "secret", 60)], dict(settings.types), sim, rng,
                           now_s=0.0)
    fleet = Fleet(devices, link, ledger, sim, dict(settings.types), max_awake=10,
                  max_payload_bytes=settings.coap.max_payload_bytes)
    try:
        fleet.start(duration_s=600.0)
        await poll(lambda: ledger.service_unavailable + ledger.rate_limited == 1)

        (sim_device,) = fleet.devices
        assert sim_device.report is not None  # the same report waits for the retry
        assert sim_device.handle is not None
        assert sim_device.handle.when() - loop.time() > 100  # Max-Age 120 s, not the 0.01 s interval
        assert len(server.payloads) == 1
        assert ledger.rejected_by_code == {}
    finally:
        fleet.stop()
        await fleet.drain(0)
        transport.close()


async def poll(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
