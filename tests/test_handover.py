"""The handover of seqs between gateway hosts: what a host notes for the devices it holds,
the rule by which the next owner counts duplicates, the wire format, and the peer channel's
`S`/`K` messages under garbage (authentic or not): never an exception, never a crash."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway.cluster import handover
from gateway.cluster.handover import Holdings, seqs_of
from gateway.cluster.membership import Membership
from gateway.cluster.peers import PeerChannel
from gateway.config import ClusterSection
from gateway.pipeline.replay import NotedReplayWindow, ReplayWindow, Seen, merge_foreign
from gateway.runtime.metrics import Metrics

SECRET = "test-cluster-secret-0123456789"
seqs = st.integers(0, (1 << 63) - 1)


def holding(device_id: str, accepted: list[int]) -> Holdings:
    holdings = Holdings()
    holdings.held = {device_id}
    window = NotedReplayWindow(ReplayWindow(), holdings.note)
    for seq in accepted:
        window.accept(device_id, seq, None, window.check(device_id, seq, None))
    return holdings


def test_a_holder_notes_the_first_and_last_64_seqs_and_nothing_for_its_own_devices() -> None:
    holdings = holding("dev", list(range(17, 217)))
    holdings.note("home-dev", 5, Seen.NEW)  # not held: its home is this host
    given_up = holdings.give_up(lambda device_id: False)
    assert list(given_up) == ["dev"]
    assert seqs_of(given_up["dev"]) == [*range(17, 81), *range(153, 217)]
    assert holdings.give_up(lambda device_id: False) == {}  # handed over once


def test_the_new_owner_counts_the_seqs_both_hosts_accepted_and_refuses_the_rest() -> None:
    home = ReplayWindow()
    for seq in (15, 16, 17):  # home accepted these, then died
        home.accept("dev", seq, None, Seen.NEW)
    heir = holding("dev", [17, 18, 19]).give_up(lambda device_id: False)["dev"]

    duplicates = merge_foreign(home, set(), "dev", seqs_of(heir))

    assert duplicates == [17]
    assert home.check("dev", 18, None) is Seen.DUPLICATE  # the heir's: refused here too
    assert merge_foreign(home, set(), "dev", [20]) == []  # a seq being new is no duplicate


def test_a_seq_still_being_committed_here_is_a_duplicate_too() -> None:
    assert merge_foreign(ReplayWindow(), {("dev", 17)}, "dev", [17]) == [17]


@given(st.dictionaries(st.text(min_size=1, max_size=64), st.tuples(seqs, st.integers(0, 2**64 - 1),
                                                                   seqs, st.integers(0, 2**64 - 1)),
                       max_size=200))
def test_spans_survive_the_wire_in_bounded_messages(spans: dict[str, handover.Span]) -> None:
    bodies = handover.encode(spans)
    assert all(len(body) <= handover.MAX_BODY_BYTES for body in bodies)
    decoded: dict[str, handover.Span] = {}
    for body in bodies:
        decoded.update(handover.decode(body))
    assert decoded == {d: s for d, s in spans.items() if len(d.encode()) <= 255}


@given(st.binary(max_size=2000))
def test_a_garbage_body_is_a_value_error_and_nothing_else(body: bytes) -> None:
    try:
        spans = handover.decode(body)
    except ValueError:
        return
    for span in spans.values():
        assert all(0 <= seq < 1 << 63 for seq in seqs_of(span))


class _Transport(asyncio.DatagramTransport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: object = None) -> None:
        assert isinstance(addr, tuple)
        self.sent.append((data, addr))

    def is_closing(self) -> bool:
        return False


def channel(me: str = "h1") -> tuple[PeerChannel, Metrics, list[tuple[str, dict[str, handover.Span]]]]:
    cluster = ClusterSection(enabled=True, host=me, secret=SECRET, check_uplink_queue=False,
                             hosts={"h1": "127.0.0.1:7001", "h2": "127.0.0.1:7002"})
    metrics = Metrics(CollectorRegistry())
    peers = PeerChannel(cluster, 0, 1, metrics, Membership(me, cluster.hosts, 2.0))
    got: list[tuple[str, dict[str, handover.Span]]] = []
    peers._handed_over = lambda sender, spans: got.append((sender, spans))
    peers._relayed = peers._send_to_device = lambda data, addr: None
    peers.connection_made(_Transport())
    return peers, metrics, got


def signed(kind: bytes, body: bytes, sender: bytes = b"h2") -> bytes:
    message = struct.pack("!BcB", 1, kind, len(sender)) + sender + b"\0" + body
    return message + hmac.new(SECRET.encode(), message, hashlib.sha256).digest()[:16]


def test_a_handover_is_acted_on_once_and_acknowledged_each_time() -> None:
    sender, _, _ = channel("h2")
    receiver, _, got = channel("h1")
    sender.hand_over("h1", {"dev": (17, 1, 17, 1)})
    transport = sender._transport
    assert isinstance(transport, _Transport)
    (message, _), = transport.sent
    for _ in range(2):  # the original and a resend
        receiver.datagram_received(message, ("127.0.0.1", 7002))
    assert got == [("h2", {"dev": (17, 1, 17, 1)})]
    acks = receiver._transport
    assert isinstance(acks, _Transport) and len(acks.sent) == 2
    sender.datagram_received(acks.sent[0][0], ("127.0.0.1", 7001))
    assert sender._unacked == {}


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from([b"H", b"F", b"R", b"S", b"K", b"Z"]), body=st.binary(max_size=1500),
       authentic=st.booleans())
def test_garbage_on_the_peer_channel_never_raises_or_logs_an_error(
        kind: bytes, body: bytes, authentic: bool) -> None:
    peers, _, got = channel()
    data = signed(kind, body) if authentic else body
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("gateway.cluster").addHandler(handler)
    try:
        peers.datagram_received(data, ("127.0.0.1", 7002))
    finally:
        logging.getLogger("gateway.cluster").removeHandler(handler)
    assert not [r for r in records if r.levelno >= logging.ERROR], records
    for _, spans in got:  # whatever got through is well-formed
        assert all(isinstance(d, str) and len(s) == 4 for d, s in spans.items())


@pytest.mark.parametrize("forged", [b"\0" * 16, b"x" * 16])
def test_an_unsigned_handover_is_dropped_unread(forged: bytes) -> None:
    peers, metrics, got = channel()
    body = struct.pack("!Q", 1) + handover.encode({"dev": (1, 1, 1, 1)})[0]
    data = signed(b"S", body)[:-16] + forged
    peers.datagram_received(data, ("127.0.0.1", 7002))
    assert got == []
    assert metrics.registry.get_sample_value(
        "nbiot_gateway_cluster_peer_messages_rejected_total", {"reason": "bad_mac"}) == 1
