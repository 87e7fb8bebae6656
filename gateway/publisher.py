"""The MQTT side: reads the spool in order, publishes QoS 1, deletes only what was PUBACKed.

Owns the one broker connection: reconnects with backoff, keeps the gateway's retained
status (`online`, last will `offline`). It never deletes a record it has not seen acked,
so a broker outage or a crash only ever causes a re-send, never a loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable

import aiomqtt

from gateway.config import MqttSection
from gateway.metrics import Metrics
from gateway.model import Record
from gateway.spool import Spool

log = logging.getLogger(__name__)
PUBLISH_TIMEOUT_S = 30.0
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


class ConnectionLost(Exception):
    """The broker connection broke while publishing; everything unacked is re-sent."""


class Publisher:
    """`await Publisher(...).run(stop)`: returns once `stop` is set and the spool is empty."""

    def __init__(self, mqtt: MqttSection, gateway_id: str, spool: Spool, metrics: Metrics) -> None:
        self._mqtt = mqtt
        self._spool = spool
        self._metrics = metrics
        self._status_topic = status_topic(mqtt, gateway_id)
        self._client_id = mqtt.client_id or f"nbiot-gateway-{gateway_id}"
        self._backoff = Backoff(mqtt.reconnect_min_s, mqtt.reconnect_max_s)
        self._acked: list[Record] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()  # set while nothing is in flight
        self._idle.set()
        self._broken: asyncio.Event = asyncio.Event()
        self.connected = False

    def _client(self) -> aiomqtt.Client:
        tls_context = None
        if self._mqtt.tls:
            tls_context = ssl.create_default_context(
                cafile=str(self._mqtt.tls_ca_file) if self._mqtt.tls_ca_file else None
            )
        password = self._mqtt.password.get_secret_value() if self._mqtt.password else None
        client = aiomqtt.Client(
            self._mqtt.host,
            self._mqtt.port,
            username=self._mqtt.username,
            password=password,
            identifier=self._client_id,
            will=aiomqtt.Will(self._status_topic, b"offline", qos=1, retain=True),
            clean_session=True,
            keepalive=self._mqtt.keepalive_s,
            timeout=10,
            max_inflight_messages=self._mqtt.inflight_window,
            tls_context=tls_context,
        )
        # aiomqtt logs a WARNING per publish beyond 10 awaiting their PUBACK; our window is
        # meant to be full during a drain (one line per record flooded the journal).
        client.pending_calls_threshold = self._mqtt.inflight_window + 1
        return client

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until `stop` is set and the spool is empty; reconnect as needed."""
        while True:
            try:
                async with self._client() as client:
                    await self._session(client, stop)
                    return
            except (aiomqtt.MqttError, ConnectionLost, OSError) as e:
                self._set_connected(False)
                if stop.is_set():
                    # Stopping: the spool keeps the rest for the next start; retrying here
                    # would only delay the stop (and hammer the broker) for nothing.
                    log.warning("broker %s:%d unavailable while stopping (%s); %d records stay "
                                "spooled", self._mqtt.host, self._mqtt.port,
                                e or type(e).__name__, self._spool.records)
                    return
                self._metrics.mqtt_reconnects.inc()
                delay = self._backoff.next_delay()
                log.warning("broker %s:%d unavailable (%s); %d records spooled; retry in %.1fs",
                            self._mqtt.host, self._mqtt.port, e or type(e).__name__,
                            self._spool.records, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    async def _session(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        await client.publish(self._status_topic, b"online", qos=1, retain=True)
        self._set_connected(True)
        self._backoff.reset()
        log.info("connected to broker %s:%d as %s; %d records to publish",
                 self._mqtt.host, self._mqtt.port, self._client_id, self._spool.records)
        self._broken = asyncio.Event()
        watcher = asyncio.create_task(self._watch(client), name="mqtt-watch")
        try:
            await self._publish_spool(client, stop)
            await client.publish(self._status_topic, b"offline", qos=1, retain=True)
            log.info("published the spool and marked the gateway offline; disconnecting")
        except asyncio.CancelledError:
            # The drain ran out of time. A clean disconnect makes the broker discard the last
            # will, so say `offline` ourselves; QoS 0 is written at once, not queued behind
            # the unacked window.
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(self._status_topic, b"offline", qos=0, retain=True,
                                     timeout=STATUS_TIMEOUT_S)
            raise
        finally:
            watcher.cancel()
            for task in list(self._in_flight):
                task.cancel()
            await asyncio.gather(*self._in_flight, watcher, return_exceptions=True)
            self._in_flight.clear()  # a task cancelled before it ran never removed itself
            self._idle.set()
            self._flush_acked()
            self._set_connected(False)

    async def _watch(self, client: aiomqtt.Client) -> None:
        """Notice a lost connection even while idle (message iteration fails on disconnect)."""
        try:
            async for _ in client.messages:
                pass
        finally:
            self._broken.set()

    async def _publish_spool(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        window = asyncio.Semaphore(self._mqtt.inflight_window)
        cursor = 0  # a new connection re-reads everything not yet acked...
        await self._spool.wait_deleted()  # ...and nothing acked on the last one
        while True:
            if self._broken.is_set():
                raise ConnectionLost("connection to the broker lost")
            records = await self._spool.read_after(cursor, self._mqtt.inflight_window)
            if not records:
                self._flush_acked()
                if stop.is_set() and not self._in_flight:
                    if self._spool.records:
                        log.warning("%d records were not published in this run; they stay "
                                    "spooled for the next start", self._spool.records)
                    return
                # When draining, wake once nothing is in flight: waiting on `stop` (already
                # set) or on every publish would spin the loop until the last PUBACK.
                await _first_of(self._spool.wait_for_records(), self._broken.wait(),
                                self._idle.wait() if stop.is_set() else stop.wait())
                continue
            for record in records:
                if window.locked():
                    await _first_of(window.acquire(), self._broken.wait())
                else:
                    await window.acquire()
                if self._broken.is_set():
                    raise ConnectionLost("connection to the broker lost")
                task = asyncio.create_task(self._publish_one(client, record, window))
                self._in_flight.add(task)
                self._idle.clear()
            cursor = records[-1].spool_id

    async def _publish_one(
        self, client: aiomqtt.Client, record: Record, window: asyncio.Semaphore
    ) -> None:
        started = time.monotonic()
        try:
            await client.publish(record.topic, record.payload, qos=1, retain=record.retain,
                                 timeout=PUBLISH_TIMEOUT_S)
        except aiomqtt.MqttError as e:
            log.debug("publish of spool record %d failed: %s", record.spool_id, e)
            self._broken.set()
            return
        finally:
            self._in_flight.discard(asyncio.current_task())
            if not self._in_flight:
                self._idle.set()
            window.release()
        self._metrics.mqtt_published.inc()
        self._metrics.mqtt_publish_seconds.observe(time.monotonic() - started)
        if not self._acked:
            asyncio.get_running_loop().call_soon(self._flush_acked)
        self._acked.append(record)

    def _flush_acked(self) -> None:
        """Delete acked records from the spool, many per call."""
        if self._acked:
            self._spool.delete(self._acked)
            self._acked = []

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        self._metrics.mqtt_connected.set(1 if connected else 0)


async def _first_of(*aws: Awaitable[object]) -> None:
    """Wait until the first of these awaitables completes; cancel the coroutines' rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for aw, task in zip(aws, tasks, strict=True):
            if task is not aw:
                task.cancel()
