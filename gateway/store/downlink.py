"""Commands for sleeping devices: queued from MQTT, ridden in the reply to the device's next
uplink, confirmed by a later uplink's `ack`, or expired after their `ttl_s`.

NB-IoT devices sleep in PSM between uplinks, so a command waits here: in memory, and in an
SQLite file beside the spool. It must never ride before it is stored, and a confirmation
must never be answered before it is stored: `confirm` calls back once the command's row is
marked confirmed on disk, and that mark is what makes its `confirmed` state reach the spool
even across a kill -9. Each state change (`queued`, `delivered`, `confirmed`, `expired`,
`rejected`) becomes a record for `.../down/ack`. The hot path (`next_for`, `confirm`) is
dictionary work; the disk writes are group-committed in a thread, in the order they were made.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from gateway.model import Record
from gateway.pipeline.registry import Registry
from gateway.store.spool import Spool, record_size
from gateway.store.sqlitefile import Writer, open_db
from gateway.timefmt import rfc3339_ms

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 512  # one NB-IoT datagram must still carry the reply
TOO_LARGE = f"command larger than {MAX_COMMAND_BYTES} bytes"
MAX_ID_CHARS = 64
MAX_TTL_S = 30 * 86400
DEFAULT_TTL_S = 3600
MAX_PENDING_PER_DEVICE = 32
QUEUED, DELIVERED, CONFIRMED, EXPIRED, REJECTED = (
    "queued", "delivered", "confirmed", "expired", "rejected")

Key = tuple[str, str]  # (device_id, command_id): a row of the commands table

# The `delivered` column: 0 never sent, 1 sent at least once, 2 confirmed by the device,
# its `confirmed` not yet known to be in the spool. A confirmed row keeps the command's
# body (its "id" included), and `expires_at` then holds when it was confirmed.
SCHEMA = ("CREATE TABLE IF NOT EXISTS commands (device_id TEXT, command_id TEXT, "
          "body TEXT NOT NULL, expires_at REAL NOT NULL, delivered INTEGER NOT NULL, "
          "PRIMARY KEY (device_id, command_id))")
_INSERT = "INSERT OR REPLACE INTO commands VALUES (?, ?, ?, ?, ?)"
_SET_SENT = "UPDATE commands SET delivered = 1 WHERE device_id = ? AND command_id = ?"
_DELETE = "DELETE FROM commands WHERE device_id = ? AND command_id = ?"
# The confirmed row moves to a key no command can have, so its id is free at once for a
# new command, which must not overwrite the confirmation before it is spooled.
_SET_CONFIRMED = ("UPDATE commands SET command_id = ?, delivered = 2, expires_at = ?, "
                  "body = coalesce(?, body) WHERE device_id = ? AND command_id = ?")


@dataclass(slots=True)
class Command:
    device_id: str
    command_id: str
    body: dict[str, object]
    expires_at: float
    delivered: bool = False


@dataclass(slots=True, frozen=True)
class Confirmed:
    """A confirmed command's row, kept until its `confirmed` state is in the spool."""

    device_id: str
    row_key: str
    command_id: str
    confirmed_at: float
    result: dict[str, object] | None = None  # what an LwM2M device answered


def confirmed_row_key(command_id: str, confirmed_at: float) -> str:
    """The command_id column of a confirmed row: longer than any command id may be."""
    return f"{command_id} confirmed at {confirmed_at!r}".ljust(MAX_ID_CHARS + 1, ".")


def _row(command: Command) -> tuple[object, ...]:
    return (command.device_id, command.command_id, json.dumps(command.body),
            command.expires_at, int(command.delivered))


class DownlinkStore:
    """The commands table; every method runs in a worker thread, one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = Writer(path, SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        # synchronous=FULL: a command acknowledged as queued survives a power loss.
        return open_db(self.path, SCHEMA, synchronous_full=True)

    def load(self) -> list[Command]:
        """The commands waiting, in queue order."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT device_id, command_id, body, expires_at, delivered "
                              "FROM commands WHERE delivered < 2 ORDER BY rowid").fetchall()
        return [Command(d, c, json.loads(b), e, bool(dl)) for d, c, b, e, dl in rows]

    def load_confirmed(self) -> list[Confirmed]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT device_id, command_id, body, expires_at FROM commands "
                              "WHERE delivered = 2 ORDER BY rowid").fetchall()
        bodies = [(d, key, json.loads(b), at) for d, key, b, at in rows]
        return [Confirmed(d, key, str(body.get("id", "")), at, body.get("result"))
                for d, key, body, at in bodies]

    def apply(self, upserts: list[Command], deletes: list[Key]) -> None:
        """Write commands and delete rows in one transaction (rebalance builds files with it)."""
        with closing(self._connect()) as db, db:
            db.executemany(_INSERT, [_row(c) for c in upserts])
            db.executemany(_DELETE, deletes)

    def write(self, statements: list[tuple[str, tuple[object, ...]]]) -> None:
        """Run `statements` in order in one transaction: on disk when this returns, or none."""
        self._writer.write(statements)

    def close(self) -> None:
        self._writer.close()


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
    if not isinstance(command_id, str) or not 0 < len(command_id) <= MAX_ID_CHARS:
        raise CommandRejected(f"needs an \"id\": a string of 1 to {MAX_ID_CHARS} characters")
    ttl_s = body.get("ttl_s", DEFAULT_TTL_S)
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not 0 < ttl_s <= MAX_TTL_S:
        raise CommandRejected(f"ttl_s must be a number of seconds up to {MAX_TTL_S}")
    return command_id, body, float(ttl_s)


@dataclass(slots=True)
class _Write:
    key: Key  # the row it is about
    sql: str
    params: tuple[object, ...]
    # Lazy: a delivered flag or a deletion, which may wait for the periodic save and is
    # tried again if its commit fails. Urgent: an arrival or a confirmation, which has
    # someone waiting for its commit.
    lazy: bool


@dataclass(slots=True)
class _Arrival:
    command: Command
    stored: asyncio.Future[bool]


@dataclass(slots=True)
class _Confirmation:
    command: Command
    device_type: str
    position: int  # its place in the queue, to put it back if the commit fails
    confirmed: Confirmed
    then: list[Callable[[], None]] = field(default_factory=list)


@dataclass(slots=True)
class _Unspooled:
    confirmed: Confirmed
    device_type: str
    in_spool_commit: bool = False


class Downlink:
    def __init__(self, registry: Registry, store: DownlinkStore, spool: Spool,
                 topic_base: str) -> None:
        self._registry = registry
        self._store = store
        self._spool = spool
        self._topic_base = topic_base
        self._queues: dict[str, list[Command]] = {}  # what may ride: stored commands only
        # Made since the last commit, in order; the next commit takes them all.
        self._writes: list[_Write] = []
        self._arrivals: list[_Arrival] = []
        self._confirmations: list[_Confirmation] = []
        self._arriving: dict[Key, int] = {}  # commands being stored, not yet in a queue
        self._confirming: dict[Key, _Confirmation] = {}
        # Confirmed on disk, `confirmed` not yet durable in the spool; by (device, row key).
        self._unspooled: dict[Key, _Unspooled] = {}
        self._committer: asyncio.Task[None] | None = None
        self._save_asked = False
        # What else a command must be, or why not (the LwM2M server checks its `op`s).
        self.check: Callable[[dict[str, object]], str | None] = lambda body: None

    async def load(self) -> None:
        commands, confirmed = await asyncio.to_thread(
            lambda: (self._store.load(), self._store.load_confirmed()))
        for command in commands:
            self._queues.setdefault(command.device_id, []).append(command)
        if self._queues:
            log.info("downlink: %d commands pending for %d devices",
                     sum(map(len, self._queues.values())), len(self._queues))
        for row in confirmed:  # confirmed before a crash: say so now (maybe once more)
            device = self._registry.get(row.device_id)
            self._keep_unspooled(row, device.device_type if device else "unknown")
        if confirmed:
            log.info("downlink: %d confirmations from an earlier run published again",
                     len(confirmed))

    def replace_registry(self, registry: Registry) -> None:
        self._registry = registry

    # -- from MQTT -------------------------------------------------------------------
    async def receive(self, device_type: str, device_id: str, payload: bytes,
                      announce: bool = True) -> None:
        """A command published for a device: validate, store durably, queue, then say
        `queued` (unless not `announce`: a cluster host keeping the copy for the device's
        home host). Raises sqlite3.Error if it could not be stored (nothing is queued)."""
        device = self._registry.get(device_id)
        try:
            if device is None or device.device_type != device_type:
                raise CommandRejected(f"no device {device_id} of type {device_type}")
            command_id, body, ttl_s = parse_command(payload)
            why = self.check(body)
            if why:
                raise CommandRejected(why)
            if self._pending(device_id) >= MAX_PENDING_PER_DEVICE:
                raise CommandRejected(f"{MAX_PENDING_PER_DEVICE} commands already pending")
        except CommandRejected as e:
            if announce:  # a cluster's second keeper: the home host says it
                self.reject(device_type, device_id, payload, str(e))
            return
        command = Command(device_id, command_id, body, time.time() + ttl_s)
        key = (device_id, command_id)
        arrival = _Arrival(command, asyncio.get_running_loop().create_future())
        self._arriving[key] = self._arriving.get(key, 0) + 1
        self._writes.append(_Write(key, _INSERT, _row(command), lazy=False))
        self._arrivals.append(arrival)
        self._commit_soon()
        # Shielded: if our caller gives up, the commit still installs what it stored.
        if not await asyncio.shield(arrival.stored):
            raise sqlite3.OperationalError(f"downlink {command_id} of {device_id} not stored")
        if announce:
            self._status(device_id, device_type, command_id, QUEUED, "")

    def settled_elsewhere(self, device_id: str, state_message: bytes) -> None:
        """Another gateway host said a command is `confirmed` or `expired` (its
        `.../down/ack`): drop our copy, silently, so it never rides again from here."""
        try:
            message = json.loads(state_message)
            command_id, state = message["id"], message["state"]
        except (ValueError, KeyError, TypeError, RecursionError):
            return
        if state not in (CONFIRMED, EXPIRED) or not isinstance(command_id, str):
            return
        queue = self._queues.get(device_id)
        command = next((c for c in queue or () if c.command_id == command_id), None)
        if queue is None or command is None:
            return
        queue.remove(command)
        key = (device_id, command_id)
        self._writes.append(_Write(key, _DELETE, key, lazy=True))
        log.info("downlink %s of %s %s through another host: dropped here", command_id,
                 device_id, state)

    def reject(self, device_type: str, device_id: str, payload: bytes, why: str) -> None:
        """Say `rejected` on the command's ack topic (nothing is stored)."""
        log.warning("downlink for %s/%s rejected: %s", device_type, device_id, why)
        self._status(device_id, device_type, _id_of(payload), REJECTED, why)

    def _pending(self, device_id: str) -> int:
        arriving = sum(n for (d, _), n in self._arriving.items() if d == device_id)
        return len(self._queues.get(device_id, ())) + arriving

    # -- the uplink path (hot) -------------------------------------------------------
    def confirm(self, device_id: str, device_type: str, command_id: str,
                then: Callable[[], None] | None = None,
                result: dict[str, object] | None = None) -> None:
        """The device acknowledged `command_id`. It rides no more at once; `then()` runs
        on the loop once the confirmation is on disk (at once if nothing waits under that
        id, or if a command replacing it is being stored: that one will ride). If the
        commit fails, the command waits again and `then()` still runs: the reply carries
        the command again and the device acknowledges it again. `result` (an LwM2M
        device's answer: its code, the values read) is kept with the confirmation and
        published in its `confirmed` state."""
        key = (device_id, command_id)
        confirming = self._confirming.get(key)
        if confirming is not None:  # acknowledged again before the first commit ended
            if then is not None:
                confirming.then.append(then)
            return
        queue = self._queues.get(device_id, [])
        command = next((c for c in queue if c.command_id == command_id), None)
        if command is None or key in self._arriving:
            if then is not None:
                then()
            return
        position = queue.index(command)
        del queue[position]
        confirmed_at = time.time()
        row_key = confirmed_row_key(command_id, confirmed_at)
        confirmation = _Confirmation(command, device_type, position,
                                     Confirmed(device_id, row_key, command_id, confirmed_at,
                                               result),
                                     [then] if then is not None else [])
        self._confirming[key] = confirmation
        body = json.dumps({**command.body, "result": result}) if result is not None else None
        self._writes.append(_Write(key, _SET_CONFIRMED,
                                   (row_key, confirmed_at, body, device_id, command_id),
                                   lazy=False))
        self._confirmations.append(confirmation)
        self._commit_soon()

    def next_for(self, device_id: str, device_type: str, now: float) -> bytes | None:
        """The reply payload for this device's uplink: its oldest live command, or None."""
        command = self.take_next(device_id, device_type, now)
        if command is None:
            return None
        return json.dumps({**command.body, "pending": len(self._queues[device_id]) - 1},
                          separators=(",", ":")).encode()

    def take_next(self, device_id: str, device_type: str, now: float) -> Command | None:
        """The device's oldest live command, marked `delivered` (the same one again until
        it is confirmed or expires), or None."""
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
            key = (device_id, command.command_id)
            self._writes.append(_Write(key, _SET_SENT, key, lazy=True))
            self._status(device_id, device_type, command.command_id, DELIVERED, "")
        return command

    # -- housekeeping ----------------------------------------------------------------
    def sweep(self, now: float) -> None:
        for device_id, queue in self._queues.items():
            device = self._registry.get(device_id)
            for command in [c for c in queue if c.expires_at <= now]:
                queue.remove(command)
                self._expire(command, device.device_type if device else "unknown")

    async def save(self) -> None:
        """Write every change made so far (delivered flags, expiries too), and spool the
        confirmations the spool had no room for."""
        for unspooled in list(self._unspooled.values()):
            self._spool_confirmed(unspooled)
        if self._writes:
            self._save_asked = True
            self._commit_soon()
        if self._committer is not None:
            await asyncio.shield(self._committer)

    async def close(self) -> None:
        await self.save()
        await asyncio.to_thread(self._store.close)

    def _expire(self, command: Command, device_type: str) -> None:
        key = (command.device_id, command.command_id)
        self._writes.append(_Write(key, _DELETE, key, lazy=True))
        self._status(command.device_id, device_type, command.command_id, EXPIRED,
                     f"not confirmed before {rfc3339_ms(command.expires_at)}")

    # -- the commits -----------------------------------------------------------------
    def _commit_soon(self) -> None:
        if self._committer is None or self._committer.done():
            self._committer = asyncio.get_running_loop().create_task(
                self._commit_while_asked(), name="downlink-commit")

    async def _commit_while_asked(self) -> None:
        """Commit until nothing urgent waits: each commit takes everything made during the
        one before, so a burst of confirmations costs a few fsyncs, not one each."""
        while self._arrivals or self._confirmations or self._save_asked:
            self._save_asked = False
            try:
                await self._commit()
            except Exception:  # task boundary: every waiter has been told; go on
                log.exception("downlink commit failed")

    async def _commit(self) -> None:
        writes, arrivals, confirmations = self._writes, self._arrivals, self._confirmations
        self._writes, self._arrivals, self._confirmations = [], [], []
        if not writes:
            return
        try:
            await asyncio.to_thread(self._store.write, [(w.sql, w.params) for w in writes])
        except sqlite3.Error as e:
            log.error("downlink commit of %d changes failed: %s; %d commands not stored "
                      "(not acknowledged to the broker), %d confirmations not stored (the "
                      "commands wait again)", len(writes), e, len(arrivals), len(confirmations))
            self._writes = [w for w in writes if w.lazy] + self._writes
            for arrival in arrivals:
                self._arrived(arrival, False)
            for confirmation in confirmations:
                self._unconfirm(confirmation)
            return
        for arrival in arrivals:
            self._arrived(arrival, True)
        for confirmation in confirmations:
            self._confirmed(confirmation)

    def _arrived(self, arrival: _Arrival, stored: bool) -> None:
        command = arrival.command
        key = (command.device_id, command.command_id)
        self._arriving[key] -= 1
        if not self._arriving[key]:
            del self._arriving[key]
        if stored:
            queue = self._queues.setdefault(command.device_id, [])
            queue[:] = [c for c in queue if c.command_id != command.command_id]  # replaced
            queue.append(command)
            # Writes made during this commit were about the command it replaced: the row
            # is the new one's now.
            self._writes = [w for w in self._writes if not (w.lazy and w.key == key)]
        arrival.stored.set_result(stored)

    def _confirmed(self, confirmation: _Confirmation) -> None:
        row = confirmation.confirmed
        del self._confirming[(row.device_id, row.command_id)]
        self._keep_unspooled(row, confirmation.device_type)
        _run_all(confirmation.then)

    def _unconfirm(self, confirmation: _Confirmation) -> None:
        command = confirmation.command
        del self._confirming[(command.device_id, command.command_id)]
        self._queues.setdefault(command.device_id, []).insert(confirmation.position, command)
        _run_all(confirmation.then)

    def _keep_unspooled(self, row: Confirmed, device_type: str) -> None:
        unspooled = _Unspooled(row, device_type)
        self._unspooled[(row.device_id, row.row_key)] = unspooled
        self._spool_confirmed(unspooled)

    def _spool_confirmed(self, unspooled: _Unspooled) -> None:
        """Append `confirmed` to the spool; once it is durable there, the row can go."""
        if unspooled.in_spool_commit:
            return
        row = unspooled.confirmed
        record = self._status_record(row.device_id, unspooled.device_type, row.command_id,
                                     CONFIRMED, "", row.confirmed_at, row.result)
        if not self._spool.has_room(record_size(record)):
            log.warning("spool full: `confirmed` of downlink %s of %s waits for room",
                        row.command_id, row.device_id)
            return
        unspooled.in_spool_commit = True
        self._spool.append(record, functools.partial(self._confirmation_spooled, unspooled))

    def _confirmation_spooled(self, unspooled: _Unspooled, ok: bool) -> None:
        unspooled.in_spool_commit = False
        if not ok:
            return  # tried again at the next save
        key = (unspooled.confirmed.device_id, unspooled.confirmed.row_key)
        del self._unspooled[key]
        self._writes.append(_Write(key, _DELETE, key, lazy=True))

    # -- state changes on MQTT -------------------------------------------------------
    def _status(self, device_id: str, device_type: str, command_id: str, state: str,
                reason: str) -> None:
        """Publish a state change on `.../down/ack` (through the spool, so in order)."""
        record = self._status_record(device_id, device_type, command_id, state, reason,
                                     time.time())
        if self._spool.has_room(record_size(record)):
            self._spool.append(record, None)
        else:
            log.warning("spool full: downlink %s of %s is %s, not published", command_id,
                        device_id, state)

    def _status_record(self, device_id: str, device_type: str, command_id: str, state: str,
                       reason: str, at: float, result: dict[str, object] | None = None
                       ) -> Record:
        message: dict[str, object] = {"id": command_id, "state": state, "at": rfc3339_ms(at)}
        if reason:
            message["reason"] = reason
        if result is not None:
            message["result"] = result
        return Record(f"{self._topic_base}/{device_type}/{device_id}/down/ack",
                      json.dumps(message, separators=(",", ":")).encode())


def _run_all(callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # one broken callback must not strand the rest
            log.exception("callback of a downlink confirmation failed")


def _id_of(payload: bytes) -> str:
    try:
        value = json.loads(payload).get("id")
    except (ValueError, AttributeError, RecursionError):
        return ""
    return value if isinstance(value, str) else ""
