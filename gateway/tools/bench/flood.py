"""A bare QoS 1 publisher for the broker benchmarks: a window of PUBLISHes awaiting PUBACK,
optionally paced, timed to the last PUBACK. Benchmarks only; the gateway's own publisher is
gateway/mqtt/publisher.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from gateway.mqtt.client import MqttClient

ACK_TIMEOUT_S = 60.0


async def publish_windowed(client: MqttClient, messages: Iterable[tuple[str, bytes]], n: int,
                           window: int, rate: float = 0.0) -> float:
    """Publish the first `n` of `messages` (topic, payload) at QoS 1, at most `window`
    awaiting PUBACK, `rate` a second in groups of 20 (0: as fast as the broker
    acknowledges); the monotonic time of the last PUBACK. MqttError if the broker drops
    the connection, TimeoutError if it stops acknowledging."""
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    room = asyncio.Event()
    acked = 0

    def on_ack() -> None:
        nonlocal acked
        acked += 1
        room.set()
        if acked == n:
            done.set_result(time.monotonic())

    started = time.monotonic()
    for i, (topic, payload) in enumerate(messages):
        if i == n:
            break
        if rate and i % 20 == 0:  # paced in groups of 20, as a busy gateway publishes
            await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
        while client.in_flight >= window:
            if client.closed.done():
                client.closed.result()  # raises: the broker dropped us
            room.clear()
            await asyncio.wait_for(room.wait(), ACK_TIMEOUT_S)
        client.publish(topic, payload, 1, False, on_ack)
    return await asyncio.wait_for(done, ACK_TIMEOUT_S)
