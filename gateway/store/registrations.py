"""LwM2M registrations, durable: who is registered, from which address, for how long.

A device registers about once a day and will not register again until its lifetime runs
out, so a gateway restart must keep what it was told: each Register, Update and
De-register is answered only once its row is on disk (SQLite beside the spool, commits
grouped in a thread like the downlink's). In memory the table is two dicts, by device and
by the address the device last spoke from (a Send names no device: its address does).
It never decides who may register (ingest/lwm2m does) and never sends anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gateway.store.sqlitefile import Writer, open_db

log = logging.getLogger(__name__)

SCHEMA = "CREATE TABLE IF NOT EXISTS registrations (device_id TEXT PRIMARY KEY, body TEXT NOT NULL)"
_UPSERT = "INSERT OR REPLACE INTO registrations VALUES (?, ?)"
_DELETE = "DELETE FROM registrations WHERE device_id = ?"

Endpoint = tuple[str, int]  # (host, port) the device speaks from


@dataclass(slots=True)
class Registration:
    device_id: str
    lifetime_s: int
    binding: str  # "U" (always reachable), "UQ" or "Q" (queue mode: reachable after it speaks)
    version: str  # "1.0", "1.1"
    objects: str  # the registration's object links, as the device sent them
    host: str
    port: int
    transport: str  # "coap" or "coaps"
    registered_at: float
    updated_at: float  # the last Register or Update: the lifetime counts from here
    observations: dict[str, str] = field(default_factory=dict)  # token (hex) -> path

    @property
    def endpoint(self) -> Endpoint:
        return (self.host, self.port)

    @property
    def queue_mode(self) -> bool:
        return "Q" in self.binding

    def expires_at(self) -> float:
        return self.updated_at + self.lifetime_s


class RegistrationStore:
    """The registrations table; every method runs in a worker thread, one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = Writer(path, SCHEMA)

    def load(self) -> list[Registration]:
        with closing(open_db(self.path, SCHEMA, synchronous_full=True)) as db:
            rows = db.execute("SELECT body FROM registrations").fetchall()
        return [Registration(**json.loads(body)) for (body,) in rows]

    def write(self, statements: list[tuple[str, tuple[object, ...]]]) -> None:
        """One transaction: on disk when this returns (a registration answered 2.01
        survives a power loss), or none."""
        self._writer.write(statements)

    def close(self) -> None:
        self._writer.close()


class Registrations:
    def __init__(self, store: RegistrationStore) -> None:
        self._store = store
        self._by_device: dict[str, Registration] = {}
        self._by_endpoint: dict[Endpoint, str] = {}
        self._writes: list[tuple[str, tuple[object, ...]]] = []
        self._waiting: list[Callable[[bool], None]] = []
        self._committer: asyncio.Task[None] | None = None

    async def load(self) -> None:
        for registration in await asyncio.to_thread(self._store.load):
            self._index(registration)
        if self._by_device:
            log.info("lwm2m: %d registrations kept from before the start", len(self._by_device))

    def __len__(self) -> int:
        return len(self._by_device)

    def __iter__(self) -> Iterator[Registration]:
        return iter(list(self._by_device.values()))

    def get(self, device_id: str) -> Registration | None:
        return self._by_device.get(device_id)

    def at(self, endpoint: Endpoint) -> Registration | None:
        device_id = self._by_endpoint.get(endpoint)
        return None if device_id is None else self._by_device.get(device_id)

    # -- changes: `done(ok)` runs once the change is on disk (ok) or failed to be ---------
    def put(self, registration: Registration, done: Callable[[bool], None] | None = None) -> None:
        """Register or Update: the row replaces the device's; in memory at once."""
        old = self._by_device.get(registration.device_id)
        if old is not None and self._by_endpoint.get(old.endpoint) == old.device_id:
            del self._by_endpoint[old.endpoint]
        self._index(registration)
        self._write(_UPSERT, (registration.device_id, json.dumps(asdict(registration))), done)

    def remove(self, device_id: str, done: Callable[[bool], None] | None = None) -> None:
        old = self._by_device.pop(device_id, None)
        if old is not None and self._by_endpoint.get(old.endpoint) == device_id:
            del self._by_endpoint[old.endpoint]
        self._write(_DELETE, (device_id,), done)

    def _index(self, registration: Registration) -> None:
        self._by_device[registration.device_id] = registration
        # Another device that spoke from this address before (a carrier NAT reused the
        # port) is found by address no more: only by its own next Update.
        self._by_endpoint[registration.endpoint] = registration.device_id

    def _write(self, sql: str, params: tuple[object, ...],
               done: Callable[[bool], None] | None) -> None:
        self._writes.append((sql, params))
        if done is not None:
            self._waiting.append(done)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.get_running_loop().create_task(
                self._commit_while_asked(), name="lwm2m-registrations-commit")

    async def _commit_while_asked(self) -> None:
        """Each commit takes every change made during the one before (one fsync each)."""
        while self._writes:
            writes, waiting = self._writes, self._waiting
            self._writes, self._waiting = [], []
            try:
                await asyncio.to_thread(self._store.write, writes)
                ok = True
            except sqlite3.Error as e:
                log.error("lwm2m: registration commit of %d changes failed: %s; the devices "
                          "get 5.03 and register again", len(writes), e)
                ok = False
            for done in waiting:
                try:
                    done(ok)
                except Exception:  # one broken callback must not strand the rest
                    log.exception("callback of a registration commit failed")

    def expired(self, now: float) -> list[Registration]:
        """Registrations whose lifetime ran out (they are not removed here)."""
        return [r for r in self._by_device.values() if r.expires_at() < now]

    async def close(self) -> None:
        if self._committer is not None:
            await asyncio.shield(self._committer)
        await asyncio.to_thread(self._store.close)
