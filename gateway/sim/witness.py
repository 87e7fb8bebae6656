"""The MQTT witness: subscribes to the gateway's uplink and dead-letter topics before the
fleet starts, and books every message it sees in the Ledger.

It proves delivery from the consumer's side, so it must see everything: it subscribes
with QoS 1 (a broker that caps per-client queues, like mosquitto's default
max_queued_messages 1000, can still drop for a slow subscriber: configure it unlimited).
It never publishes anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
from types import TracebackType

import aiomqtt

from gateway.config import MqttSection
from gateway.sim.ledger import Ledger


class WitnessError(Exception):
    """The witness lost (or never had) its broker connection: the run proves nothing."""


class Witness:
    """`async with Witness(...) as w:` is subscribed; `w.failed` ends when the link breaks."""

    def __init__(self, mqtt: MqttSection, tenant: str, ledger: Ledger) -> None:
        self._mqtt = mqtt
        self._ledger = ledger
        prefix = mqtt.topic_prefix
        self.uplink_filter = f"{prefix}/{tenant}/+/+/up"
        self.invalid_topic = f"{prefix}/{tenant}/invalid"
        self.messages = 0
        tls_context = None
        if mqtt.tls:
            tls_context = ssl.create_default_context(
                cafile=str(mqtt.tls_ca_file) if mqtt.tls_ca_file else None)
        self._client = aiomqtt.Client(
            mqtt.host, mqtt.port,
            username=mqtt.username,
            password=mqtt.password.get_secret_value() if mqtt.password else None,
            identifier=f"nbiot-sim-witness-{os.getpid()}-{os.urandom(3).hex()}",
            clean_session=True,
            keepalive=mqtt.keepalive_s,
            timeout=10,
            tls_context=tls_context,
        )
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Witness:
        try:
            await self._client.__aenter__()
            await self._client.subscribe(self.uplink_filter, qos=1)
            await self._client.subscribe(self.invalid_topic, qos=1)
        except aiomqtt.MqttError as e:
            raise WitnessError(f"cannot subscribe at broker {self._mqtt.host}:{self._mqtt.port}: "
                               f"{e}") from None
        self._task = asyncio.create_task(self._consume(), name="sim-witness")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, WitnessError):
                await self._task
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(None, None, None)

    @property
    def failed(self) -> asyncio.Task[None]:
        """A task that ends (with WitnessError) only if the broker connection breaks."""
        assert self._task is not None
        return self._task

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        ledger = self._ledger
        invalid = self.invalid_topic
        try:
            async for message in self._client.messages:
                self.messages += 1
                payload = message.payload
                if not isinstance(payload, bytes | bytearray):
                    continue
                try:
                    body = json.loads(payload)
                except ValueError:
                    continue
                if not isinstance(body, dict):
                    continue
                if message.topic.value == invalid:
                    ledger.dead_letter(str(body.get("reason")))
                    continue
                device_id, seq = body.get("device_id"), body.get("seq")
                if isinstance(device_id, str) and isinstance(seq, int):
                    ledger.report_delivered(device_id, seq, loop.time())
        except aiomqtt.MqttError as e:
            raise WitnessError(f"the witness lost its broker connection: {e}") from None
        raise WitnessError("the witness's message stream ended")
