"""The workers' channel on real AF_UNIX socketpairs: a downlink command waits for room in
a full inbox (a burst of forwarded uplinks) instead of failing at once, and returns once
the owner says it stored it."""

from __future__ import annotations

import asyncio
import socket
import struct

from prometheus_client import CollectorRegistry

from gateway.runtime.metrics import Metrics
from gateway.runtime.siblings import Siblings
from gateway.runtime.workers import owner

DEVICE = next(f"dev-{i}" for i in range(100) if owner(f"dev-{i}", 2) == 1)


async def test_a_command_waits_for_room_in_a_full_inbox() -> None:
    inboxes, outboxes = zip(*(socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                              for _ in range(2)), strict=True)
    worker0 = Siblings(0, inboxes[0], list(outboxes), Metrics(CollectorRegistry()))
    worker0.start(lambda data, addr: None, _never, _NoSink())
    owner_inbox = inboxes[1]
    owner_inbox.setblocking(False)
    filler = b"U" + b"x" * 1000
    while True:  # fill worker 1's inbox as a storm of forwarded uplinks would
        try:
            outboxes[1].send(filler)
        except BlockingIOError:
            break

    forwarding = asyncio.create_task(worker0.forward_command("env_th", DEVICE, b'{"id":"c"}'))
    await asyncio.sleep(0.3)
    assert not forwarding.done()  # still waiting for room, not failed
    command = b""
    while not command.startswith(b"C"):  # worker 1 catches up with its inbox
        try:
            command = owner_inbox.recv(1 << 17)
        except BlockingIOError:
            await asyncio.sleep(0.01)
    request_id = struct.unpack_from("!I", command, 1)[0]
    outboxes[0].send(b"A" + struct.pack("!I?", request_id, True))  # "stored"

    await asyncio.wait_for(forwarding, 5)
    assert command.endswith(b'{"id":"c"}')
    worker0.close()  # its inbox and every sending end
    owner_inbox.close()


async def _never(device_type: str, device_id: str, payload: bytes, announce: bool) -> None:
    raise AssertionError("worker 0 does not store another worker's command")


class _NoSink:
    def submit(self, *args: object) -> None:
        raise AssertionError("no uplinks in this test")

    def reject(self, *args: object) -> None:
        raise AssertionError("no uplinks in this test")
