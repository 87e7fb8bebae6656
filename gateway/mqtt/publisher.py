"""The MQTT side: reads the spool in order, publishes QoS 1, deletes only what was PUBACKed.

Owns the one broker connection: reconnects with backoff, keeps the gateway's retained
status (`online`, last will `offline`). It never deletes a record it has not seen acked,
so a broker outage or a crash only ever causes a re-send, never a loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable

from gateway.config import MqttSection
from gateway.model import Record
from gateway.mqtt.client import MqttClient, MqttError, Will
from gateway.runtime.metrics import Metrics
from gateway.store.spool import Spool
from gateway.waiting import first_of

log = logging.getLogger(__name__)
STATUS_TIMEOUT_S = 1.0


def status_topic(mqtt: MqttSection, gateway_id: str) -> str:
    return f"{mqtt.topic_prefix}/gateways/{gateway_id}/status"


class Backoff:
    """Exponential back-off with full jitter, reset after a connection that worked."""

    def __init__(self, min_s: float, max_s: float) -> None:
        self.min_s, self.max_s = min_s, max_s
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.min_s * (2**self._attempt))
        # Stop growing at the cap: 2**1024 overflows a float after ~1000 retries (a long outage).
        if ceiling < self.max_s:
            self._attempt += 1
        return random.uniform(self.min_s, ceiling)

    def reset(self) -> None:
        self._attempt = 0


# (device_type, device_id, payload) of a message on {prefix}/{tenant}/{type}/{id}/down
CommandHandler = Callable[[str, str, bytes], Awaitable[None]]
# (device_id, state message) of a message on {prefix}/{tenant}/{type}/{id}/down/ack
StateHandler = Callable[[str, bytes], Awaitable[None]]


class Publisher:
    """`await Publisher(...).run(stop)`: returns once `stop` is set and the spool is empty.
    With `on_command`, it also subscribes to the devices' `down` topics and hands each
    command over, in order."""

    def __init__(self, mqtt: MqttSection, gateway_id: str, spool: Spool, metrics: Metrics,
                 tenant: str = "", on_command: CommandHandler | None = None,
                 worker: int | None = None,
                 on_command_state: StateHandler | None = None) -> None:
        self._command_filter = f"{mqtt.topic_prefix}/{tenant}/+/+/down"
        self._on_command = on_command
        # A cluster: the command states other hosts publish ({...}/down/ack), by device id.
        self._on_command_state = on_command_state
        self._mqtt = mqtt
        self._spool = spool
        self._metrics = metrics
        # The gateway's retained online/offline and last will: worker 0's alone, so one
        # worker's lost connection does not mark the whole gateway offline.
        self._status_topic = None if worker else status_topic(mqtt, gateway_id)
        self._client_id = mqtt.client_id or f"nbiot-gateway-{gateway_id}"
        if worker:  # worker 0 keeps the single process's session (and its subscription)
            self._client_id += f"-w{worker}"
        self._backoff = Backoff(mqtt.reconnect_min_s, mqtt.reconnect_max_s)
        self._brokers = mqtt.broker_addresses()
        self._broker_index = 0
        self.broker = "{}:{}".format(*self._brokers[0])  # the node connected to, or tried last
        self._acked: list[Record] = []
        self._ack_arrived = asyncio.Event()
        self.connected = False

    async def _connect(self) -> MqttClient:
        """Connect to the first broker node that answers, in `mqtt.brokers` order from where
        the last attempt left off; raise the last node's MqttError if none does."""
        tls_context = None
        if self._mqtt.tls:
            tls_context = ssl.create_default_context(
                cafile=str(self._mqtt.tls_ca_file) if self._mqtt.tls_ca_file else None
            )
        password = self._mqtt.password.get_secret_value() if self._mqtt.password else None
        error = MqttError("no broker configured")
        for attempt in range(len(self._brokers)):
            host, port = self._brokers[(self._broker_index + attempt) % len(self._brokers)]
            try:
                client = await MqttClient.connect(
                    host,
                    port,
                    client_id=self._client_id,
                    keepalive_s=self._mqtt.keepalive_s,
                    username=self._mqtt.username,
                    password=password,
                    will=Will(self._status_topic, b"offline", qos=1, retain=True)
                    if self._status_topic else None,
                    tls=tls_context,
                    # A persistent session: commands published for devices while the
                    # gateway is away wait in the broker. Our own QoS 1 publishes are
                    # re-sent from the spool.
                    clean_session=False,
                )
            except MqttError as e:
                if len(self._brokers) > 1:
                    log.warning("broker node %s:%d unavailable (%s); trying the next",
                                host, port, e)
                error = e
                continue
            self._broker_index = (self._broker_index + attempt) % len(self._brokers)
            self.broker = f"{host}:{port}"
            return client
        raise error

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until `stop` is set and the spool is empty; reconnect as needed."""
        while True:
            try:
                client = await self._connect()
                try:
                    await self._session(client, stop)
                    return
                finally:
                    client.abort()
            except MqttError as e:
                self._set_connected(False)
                # A node that dropped us (RabbitMQ does on a queue leader change) or died:
                # the next attempt starts with the next node.
                self._broker_index = (self._broker_index + 1) % len(self._brokers)
                if stop.is_set():
                    # Stopping: the spool keeps the rest for the next start; retrying here
                    # would only delay the stop (and hammer the broker) for nothing.
                    log.warning("broker %s unavailable while stopping (%s); %d records stay "
                                "spooled", self._where(), e, self._spool.records)
                    return
                self._metrics.mqtt_reconnects.inc()
                delay = self._backoff.next_delay()
                log.warning("broker %s unavailable (%s); %d records spooled; retry in %.1fs",
                            self._where(), e, self._spool.records, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    async def _session(self, client: MqttClient, stop: asyncio.Event) -> None:
        if self._status_topic:
            await client.publish_and_wait(self._status_topic, b"online", qos=1, retain=True)
        self._set_connected(True)
        self._backoff.reset()
        log.info("connected to broker %s as %s; %d records to publish",
                 self.broker, self._client_id, self._spool.records)
        commands: asyncio.Task[None] | None = None
        if self._on_command is not None:
            await client.subscribe(self._command_filter, qos=1)
            if self._on_command_state is not None:
                await client.subscribe(self._command_filter + "/ack", qos=1)
            commands = asyncio.create_task(self._receive_commands(client, self._on_command),
                                           name="mqtt-commands")
        try:
            await self._publish_spool(client, stop)
            if self._status_topic:
                await client.publish_and_wait(self._status_topic, b"offline", qos=1,
                                              retain=True)
            await client.disconnect()
            log.info("published the spool%s; disconnected",
                     " and marked the gateway offline" if self._status_topic else "")
        except asyncio.CancelledError:
            # The drain ran out of time. A clean disconnect makes the broker discard the last
            # will, so say `offline` ourselves; QoS 0 is written at once, not queued behind
            # the unacked window.
            with contextlib.suppress(MqttError):
                if self._status_topic:
                    client.publish(self._status_topic, b"offline", qos=0, retain=True)
                await asyncio.wait_for(client.disconnect(), STATUS_TIMEOUT_S)
            raise
        finally:
            if commands is not None:
                commands.cancel()
                await asyncio.gather(commands, return_exceptions=True)
            self._flush_acked()
            self._set_connected(False)

    async def _publish_spool(self, client: MqttClient, stop: asyncio.Event) -> None:
        window = self._mqtt.inflight_window
        cursor = 0  # a new connection re-reads everything not yet acked...
        await self._spool.wait_deleted()  # ...and nothing acked on the last one
        while True:
            if client.closed.done():
                await client.closed  # raises the MqttError that closed it
            room = window - client.in_flight
            if room <= 0:
                self._ack_arrived.clear()
                await first_of(self._ack_arrived.wait(), client.closed)
                continue
            records = await self._spool.read_after(cursor, room)
            if not records:
                self._flush_acked()
                if stop.is_set() and not client.in_flight:
                    if self._spool.records:
                        log.warning("%d records were not published in this run; they stay "
                                    "spooled for the next start", self._spool.records)
                    return
                # Draining: wake on each PUBACK until none is in flight; otherwise on new
                # records or on the stop request.
                self._ack_arrived.clear()
                await first_of(self._spool.wait_for_records(), client.closed,
                                self._ack_arrived.wait() if stop.is_set() else stop.wait())
                continue
            sent_at = time.monotonic()
            for record in records:
                client.publish(record.topic, record.payload, qos=1, retain=record.retain,
                               on_ack=functools.partial(self._on_ack, record, sent_at))
            cursor = records[-1].spool_id

    async def _receive_commands(self, client: MqttClient, handle: CommandHandler) -> None:
        while True:
            getter = asyncio.ensure_future(client.messages.get())
            try:
                await first_of(getter, client.closed)
            finally:
                getter.cancel()  # no-op once it has its message
            if getter.cancelled():
                return  # the connection closed
            message = getter.result()
            parts = message.topic.split("/")
            if len(parts) == 6 and parts[4:] == ["down", "ack"] and self._on_command_state:
                try:
                    await self._on_command_state(parts[3], message.payload)
                except Exception:  # task boundary: not acknowledged, so it comes again
                    log.exception("command state on %s could not be handed on", message.topic)
                    continue
                client.ack(message)
                continue
            # prefix/tenant/type/id/down; a retained command would come back at every
            # reconnect and be queued again after it was confirmed: ignored, and said so.
            if len(parts) != 5 or message.retain:
                log.warning("ignored %s command on %s", "a retained" if message.retain else
                            "an unexpected", message.topic)
                client.ack(message)
                continue
            try:
                await handle(parts[2], parts[3], message.payload)
            except Exception:  # task boundary: one bad command must not stop the rest
                # Not acknowledged: the broker sends it again after the next reconnect.
                log.exception("downlink command on %s could not be stored", message.topic)
                continue
            client.ack(message)  # stored: a crash before this, and the broker sends it again

    def _on_ack(self, record: Record, sent_at: float) -> None:
        self._metrics.mqtt_publish_seconds.observe(time.monotonic() - sent_at)
        if not self._acked:
            asyncio.get_running_loop().call_soon(self._flush_acked)
        self._acked.append(record)
        self._ack_arrived.set()

    def _flush_acked(self) -> None:
        """Delete acked records from the spool, many per call."""
        if self._acked:
            self._metrics.mqtt_published.inc(len(self._acked))
            self._spool.delete(self._acked)
            self._acked = []

    def _where(self) -> str:
        if len(self._brokers) == 1:
            return self.broker
        return f"cluster ({len(self._brokers)} nodes, last tried {self.broker})"

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        self._metrics.mqtt_connected.set(1 if connected else 0)

