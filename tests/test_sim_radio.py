"""The simulator's NB-IoT radio model against a deterministic clock and random source:
latency by coverage class, loss, and NAT rebinding (then one real exchange whose
retransmission leaves from a new source port)."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator

import pytest

from gateway.ingest.coap import numbers as C
from gateway.ingest.coap import wire
from gateway.tools.sim.exchange import Exchange, Link, Outcome, build_request
from gateway.tools.sim.radio import LATENCY, Coverage, NatMapping, Radio
from gateway.tools.sim.retransmit import TransmissionParameters


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ScriptedRandom(random.Random):
    """`random()` returns the scripted draws in order."""

    def __init__(self, draws: list[float]) -> None:
        super().__init__(0)
        self.draws = list(draws)

    def random(self) -> float:
        return self.draws.pop(0)


def nat(clock: FakeClock, draws: list[float], *, idle_s: float = 30.0, p: float = 0.05) -> NatMapping:
    return NatMapping(clock, ScriptedRandom(draws), idle_timeout_s=idle_s, rebind_probability=p)


def test_retransmission_within_the_idle_timeout_keeps_the_mapping() -> None:
    clock = FakeClock()
    mapping = nat(clock, [0.9])
    clock.now += 2.5

    rebound = mapping.outbound()

    assert not rebound
    assert mapping.generation == 0


def test_retransmission_after_the_idle_timeout_gets_a_new_mapping() -> None:
    clock = FakeClock()
    mapping = nat(clock, [0.9], idle_s=20.0)
    clock.now += 20.5

    rebound = mapping.outbound()

    assert rebound
    assert mapping.generation == 1


def test_nat_rebinds_at_random_with_its_probability() -> None:
    clock = FakeClock()
    mapping = nat(clock, [0.049, 0.051, 0.01], p=0.05)

    results = [mapping.outbound() for _ in range(3)]

    assert results == [True, False, True]
    assert mapping.generation == 2


def test_reply_to_an_older_mapping_is_dropped() -> None:
    clock = FakeClock()
    mapping = nat(clock, [0.0], p=1.0)
    old = mapping.generation
    mapping.outbound()

    assert not mapping.inbound_allowed(old)
    assert mapping.inbound_allowed(mapping.generation)


def test_reply_after_the_mapping_idled_out_is_dropped() -> None:
    clock = FakeClock()
    mapping = nat(clock, [], idle_s=30.0)
    clock.now += 31.0

    assert not mapping.inbound_allowed(mapping.generation)


def test_ce2_latency_is_seconds_while_ce0_stays_under_a_second() -> None:
    radio = Radio(random.Random(3))

    ce0 = [radio.latency_s(Coverage.CE0) for _ in range(2000)]
    ce2 = [radio.latency_s(Coverage.CE2) for _ in range(2000)]

    assert max(ce0) < 1.0
    assert min(ce2) >= 1.0
    assert LATENCY[Coverage.CE0].high_s < LATENCY[Coverage.CE1].high_s < LATENCY[Coverage.CE2].high_s


def test_latency_scale_shrinks_every_draw() -> None:
    radio = Radio(random.Random(3), latency_scale=0.0)

    assert {radio.latency_s(c) for c in Coverage for _ in range(10)} == {0.0}


def test_loss_follows_the_configured_share_in_each_direction() -> None:
    radio = Radio(random.Random(11), loss_up=0.1, loss_down=0.0)

    lost_up = sum(radio.uplink_lost() for _ in range(20_000))
    lost_down = sum(radio.downlink_lost() for _ in range(20_000))

    assert 1_700 < lost_up < 2_300
    assert lost_down == 0


# -- a rebinding seen from the server -------------------------------------------------------
class SilentOnce(asyncio.DatagramProtocol):
    """Ignores the first request, answers 2.04 to the next; remembers each source."""

    def __init__(self) -> None:
        self.sources: list[tuple[str, int]] = []
        self.mids: list[int] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        msg = wire.decode(data)
        self.sources.append(addr)
        self.mids.append(msg.mid)
        if len(self.sources) >= 2 and self.transport is not None:
            self.transport.sendto(wire.encode(wire.Message(C.ACK, C.CHANGED, msg.mid, msg.token)),
                                  addr)


@pytest.fixture
async def silent_once() -> AsyncIterator[tuple[SilentOnce, int]]:
    transport, server = await asyncio.get_running_loop().create_datagram_endpoint(
        SilentOnce, local_addr=("127.0.0.1", 0))
    yield server, transport.get_extra_info("sockname")[1]
    transport.close()


async def test_rebinding_sends_the_retransmission_from_a_new_source_port(
    silent_once: tuple[SilentOnce, int],
) -> None:
    server, port = silent_once
    rng = random.Random(5)
    link = Link(asyncio.get_running_loop(), ("127.0.0.1", port), socket.AF_INET,
                Radio(rng, latency_scale=0.0), rng,
                TransmissionParameters(ack_timeout_s=0.1), nat_idle_timeout_s=3600.0,
                nat_rebind_probability=1.0)
    done: asyncio.Future[Exchange] = asyncio.get_running_loop().create_future()
    exchange = Exchange(link, source_ip="127.0.0.1", coverage=Coverage.CE0, mid=77, token=b"t",
                        request=build_request(77, b"t", "th-00001", "k", 50, b'{"seq":1}'),
                        on_done=done.set_result)

    exchange.start()
    await asyncio.wait_for(done, 30)

    assert exchange.outcome is Outcome.ACKED
    assert exchange.rebinds >= 1
    assert server.mids[:2] == [77, 77]
    assert server.sources[0][1] != server.sources[1][1]


# -- delays without timers: a reply handled on receipt never overtakes one on its way ------
class ScriptedRadio(Radio):
    """No loss; each one-way latency is the next of `latencies_s`."""

    def __init__(self, latencies_s: list[float]) -> None:
        super().__init__(random.Random(0))
        self.latencies_s = list(latencies_s)

    def latency_s(self, coverage: Coverage) -> float:
        return self.latencies_s.pop(0)


class NumberedReplies(asyncio.DatagramProtocol):
    """Answers every request 2.04 with the payload `reply-N`, N counting requests."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.requests = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        msg = wire.decode(data)
        self.requests += 1
        assert self.transport is not None
        self.transport.sendto(wire.encode(wire.Message(
            C.ACK, C.CHANGED, msg.mid, msg.token, [], f"reply-{self.requests}".encode())), addr)


async def test_a_reply_still_on_its_way_reaches_the_device_before_a_later_one() -> None:
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(NumberedReplies,
                                                          local_addr=("127.0.0.1", 0))
    # ACK_TIMEOUT 0.1 s, no randomness: retransmission at 0.1 s, next deadline 0.3 s.
    # Reply 1 takes 0.2 s down (past the first deadline: it waits in a timer); reply 2,
    # to the retransmission, 0.15 s: it is read before reply 1 arrives, but would reach
    # the device at 0.25 s, after it.
    radio = ScriptedRadio([0.0, 0.2, 0.0, 0.15])
    rng = random.Random(1)
    link = Link(loop, ("127.0.0.1", transport.get_extra_info("sockname")[1]), socket.AF_INET,
                radio, rng, TransmissionParameters(ack_timeout_s=0.1, ack_random_factor=1.0),
                nat_idle_timeout_s=3600.0, nat_rebind_probability=0.0)
    done: asyncio.Future[Exchange] = loop.create_future()
    exchange = Exchange(link, source_ip="127.0.0.1", coverage=Coverage.CE0, mid=9, token=b"tk",
                        request=build_request(9, b"tk", "th-00001", "k", 50, b'{"seq":1}'),
                        on_done=done.set_result)
    try:
        exchange.start()
        await asyncio.wait_for(done, 30)
    finally:
        transport.close()

    assert exchange.outcome is Outcome.ACKED
    assert peer.requests == 2
    assert exchange.reply_payload == b"reply-1"
