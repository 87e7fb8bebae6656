"""Commands for sleeping devices: queued from MQTT, ridden in the reply to the device's next
uplink, confirmed by a later uplink's `ack`, or expired after their `ttl_s`.

NB-IoT devices sleep in PSM between uplinks, so a command waits here (in memory, and in
an SQLite file beside the spool so a restart keeps it). Each state change (`queued`,
`delivered`, `confirmed`, `expired`, `rejected`) becomes a record for `.../down/ack`.
The hot path (`next_for`, `confirm`) is dictionary work; disk writes happen in a thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from gateway.model import Record
from gateway.registry import Registry
from gateway.spool import Spool, record_size
from gateway.sqlitefile import open_db
from gateway.timefmt import rfc3339_ms

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 512  # one NB-IoT datagram must still carry the reply
TOO_LARGE = f"command larger than {MAX_COMMAND_BYTES} bytes"
MAX_TTL_S = 30 * 86400
DEFAULT_TTL_S = 3600
MAX_PENDING_PER_DEVICE = 32
QUEUED, DELIVERED, CONFIRMED, EXPIRED, REJECTED = (
    "queued", "delivered", "confirmed", "expired", "rejected")


@dataclass(slots=True)
class Command:
    device_id: str
    command_id: str
    body: dict[str, object]
    expires_at: float
    delivered: bool = False


class DownlinkStore:
    """The commands table; every method runs in a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        # synchronous=FULL: a command acknowledged as queued survives a power loss.
        return open_db(self.path, "CREATE TABLE IF NOT EXISTS commands (device_id TEXT, "
                       "command_id TEXT, body TEXT NOT NULL, expires_at REAL NOT NULL, "
                       "delivered INTEGER NOT NULL, PRIMARY KEY (device_id, command_id))",
                       synchronous_full=True)

    def load(self) -> list[Command]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT device_id, command_id, body, expires_at, delivered "
                              "FROM commands ORDER BY rowid").fetchall()
        return [Command(d, c, json.loads(b), e, bool(dl)) for d, c, b, e, dl in rows]

    def apply(self, upserts: list[Command], deletes: list[tuple[str, str]]) -> None:
        with closing(self._connect()) as db, db:
            db.executemany("INSERT OR REPLACE INTO commands VALUES (?, ?, ?, ?, ?)",
                           [(c.device_id, c.command_id, json.dumps(c.body), c.expires_at,
                             int(c.delivered)) for c in upserts])
            db.executemany("DELETE FROM commands WHERE device_id = ? AND command_id = ?", deletes)


class CommandRejected(ValueError):
    pass


def parse_command(payload: bytes) -> tuple[str, dict[str, object], float]:
    """(id, body, ttl_s) of a command message, or CommandRejected saying why."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandRejected(TOO_LARGE)
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        raise CommandRejected("not JSON") from None
    if not isinstance(body, dict):
        raise CommandRejected("not a JSON object")
    command_id = body.get("id")
    if not isinstance(command_id, str) or not 0 < len(command_id) <= 64:
        raise CommandRejected("needs an \"id\": a string of 1 to 64 characters")
    ttl_s = body.get("ttl_s", DEFAULT_TTL_S)
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not 0 < ttl_s <= MAX_TTL_S:
        raise CommandRejected(f"ttl_s must be a number of seconds up to {MAX_TTL_S}")
    return command_id, body, float(ttl_s)


class Downlink:
    def __init__(self, registry: Registry, store: DownlinkStore, spool: Spool,
                 topic_base: str) -> None:
        self._registry = registry
        self._store = store
        self._spool = spool
        self._topic_base = topic_base
        self._queues: dict[str, list[Command]] = {}
        self._upserts: dict[tuple[str, str], Command] = {}
        self._deletes: set[tuple[str, str]] = set()
        self._saving = asyncio.Lock()

    async def load(self) -> None:
        for command in await asyncio.to_thread(self._store.load):
            self._queues.setdefault(command.device_id, []).append(command)
        if self._queues:
            log.info("downlink: %d commands pending for %d devices",
                     sum(map(len, self._queues.values())), len(self._queues))

    def replace_registry(self, registry: Registry) -> None:
        self._registry = registry


    # -- from MQTT -------------------------------------------------------------------
    async def receive(self, device_type: str, device_id: str, payload: bytes) -> None:
        """A command published for a device: validate, store durably, then say `queued`."""
        device = self._registry.get(device_id)
        try:
            if device is None or device.device_type != device_type:
                raise CommandRejected(f"no device {device_id} of type {device_type}")
            command_id, body, ttl_s = parse_command(payload)
            queue = self._queues.setdefault(device_id, [])
            if len(queue) >= MAX_PENDING_PER_DEVICE:
                raise CommandRejected(f"{MAX_PENDING_PER_DEVICE} commands already pending")
        except CommandRejected as e:
            self.reject(device_type, device_id, payload, str(e))
            return
        queue[:] = [c for c in queue if c.command_id != command_id]  # a re-sent id replaces
        command = Command(device_id, command_id, body, time.time() + ttl_s)
        queue.append(command)
        self._deletes.discard((device_id, command_id))  # a confirmed id may be used again
        self._upserts[(device_id, command_id)] = command
        await self.save()
        self._status(device_id, device_type, command_id, QUEUED, "")

    def reject(self, device_type: str, device_id: str, payload: bytes, why: str) -> None:
        """Say `rejected` on the command's ack topic (nothing is stored)."""
        log.warning("downlink for %s/%s rejected: %s", device_type, device_id, why)
        self._status(device_id, device_type, _id_of(payload), REJECTED, why)

    # -- the uplink path (hot) -------------------------------------------------------
    def confirm(self, device_id: str, device_type: str, command_id: str) -> None:
        queue = self._queues.get(device_id)
        if not queue:
            return
        for command in queue:
            if command.command_id == command_id:
                queue.remove(command)
                self._forget(command)
                self._status(device_id, device_type, command_id, CONFIRMED, "")
                return

    def next_for(self, device_id: str, device_type: str, now: float) -> bytes | None:
        """The reply payload for this device's uplink: its oldest live command, or None."""
        queue = self._queues.get(device_id)
        if not queue:
            return None
        while queue and queue[0].expires_at <= now:
            self._expire(queue.pop(0), device_type)
        if not queue:
            return None
        command = queue[0]
        if not command.delivered:
            command.delivered = True
            self._upserts[(device_id, command.command_id)] = command
            self._status(device_id, device_type, command.command_id, DELIVERED, "")
        return json.dumps({**command.body, "pending": len(queue) - 1},
                          separators=(",", ":")).encode()

    # -- housekeeping ----------------------------------------------------------------
    def sweep(self, now: float) -> None:
        for device_id, queue in self._queues.items():
            device = self._registry.get(device_id)
            for command in [c for c in queue if c.expires_at <= now]:
                queue.remove(command)
                self._expire(command, device.device_type if device else "unknown")

    async def save(self) -> None:
        """Write the changes since the last save; one save at a time, in order."""
        async with self._saving:
            if not self._upserts and not self._deletes:
                return
            upserts, deletes = self._upserts, self._deletes
            self._upserts, self._deletes = {}, set()
            try:
                await asyncio.to_thread(self._store.apply, list(upserts.values()), list(deletes))
            except sqlite3.Error:
                # Keep them for the next save, unless something newer replaced them.
                self._upserts = {**upserts, **self._upserts}
                self._deletes = (deletes - set(self._upserts)) | self._deletes
                raise

    def _expire(self, command: Command, device_type: str) -> None:
        self._forget(command)
        self._status(command.device_id, device_type, command.command_id, EXPIRED,
                     f"not confirmed before {rfc3339_ms(command.expires_at)}")

    def _forget(self, command: Command) -> None:
        key = (command.device_id, command.command_id)
        self._upserts.pop(key, None)
        self._deletes.add(key)


    def _status(self, device_id: str, device_type: str, command_id: str, state: str,
                reason: str) -> None:
        """Publish a state change on `.../down/ack` (through the spool, so in order)."""
        message: dict[str, object] = {"id": command_id, "state": state,
                                      "at": rfc3339_ms(time.time())}
        if reason:
            message["reason"] = reason
        record = Record(f"{self._topic_base}/{device_type}/{device_id}/down/ack",
                        json.dumps(message, separators=(",", ":")).encode())
        if self._spool.has_room(record_size(record)):
            self._spool.append(record, None)
        else:
            log.warning("spool full: downlink %s of %s is %s, not published", command_id,
                        device_id, state)


def _id_of(payload: bytes) -> str:
    try:
        value = json.loads(payload).get("id")
    except (ValueError, AttributeError, RecursionError):
        return ""
    return value if isinstance(value, str) else ""
