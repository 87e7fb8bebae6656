"""Device liveness ("100% online monitoring"): last seen, and online/offline/never_seen.

An uplink costs one dict store; a periodic sweep (not a timer per device) marks devices
offline after `offline_after_intervals` missed reports. Each state change becomes a
retained MQTT status record in the spool. The table is saved beside the spool, so a
restart remembers who was seen when. It never blocks the event loop on disk I/O.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

from gateway.model import Record
from gateway.pipeline.registry import Device, Registry
from gateway.runtime.metrics import Metrics
from gateway.store.spool import Spool, record_size
from gateway.store.sqlitefile import open_db
from gateway.timefmt import rfc3339_ms

log = logging.getLogger(__name__)

ONLINE, OFFLINE, NEVER_SEEN = "online", "offline", "never_seen"
STATES = (ONLINE, OFFLINE, NEVER_SEEN)
# Wall and monotonic clocks disagreeing by more than this between two sweeps is a jump.
CLOCK_JUMP_S = 5.0


class LivenessStore:
    """SQLite table device_id -> (last_seen, state); used from a worker thread only."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        return open_db(self.path, "CREATE TABLE IF NOT EXISTS last_seen (device_id TEXT PRIMARY "
                       "KEY, seen_at REAL NOT NULL, state TEXT NOT NULL)", synchronous_full=False)

    def load(self) -> dict[str, tuple[float, str]]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT device_id, seen_at, state FROM last_seen").fetchall()
        return {device_id: (seen_at, state) for device_id, seen_at, state in rows}

    def save(self, rows: list[tuple[str, float, str]]) -> None:
        with closing(self._connect()) as db, db:
            db.executemany("INSERT INTO last_seen (device_id, seen_at, state) VALUES (?, ?, ?) "
                           "ON CONFLICT(device_id) DO UPDATE SET seen_at=excluded.seen_at, "
                           "state=excluded.state", rows)


class Liveness:
    def __init__(
        self,
        registry: Registry,
        spool: Spool,
        metrics: Metrics,
        topic_base: str,
        offline_after_intervals: float,
        store: LivenessStore,
    ) -> None:
        self._registry = registry
        self._spool = spool
        self._metrics = metrics
        self._topic_base = topic_base
        self._offline_after = offline_after_intervals
        self._store = store
        self._seen_at: dict[str, float] = {}
        self._state: dict[str, str] = {}  # ONLINE or OFFLINE; absent means never seen
        # Taken over from a host that is down, not heard here yet (cluster.enabled).
        self._adopted: set[str] = set()
        self._dirty: set[str] = set()
        self._counts = dict.fromkeys(STATES, 0)
        self._last_sweep: tuple[float, float] | None = None  # (wall, monotonic) clocks
        # In a cluster: whether this host owns a device now, and the registry's devices it
        # owns (recomputed when either changes). Only the owner judges a device.
        self._owns: Callable[[str], bool] | None = None
        self.owned: set[str] | None = None
        self._shortest_interval_s = _shortest_interval_s(registry)

    # -- start and reload --------------------------------------------------------------
    async def load(self) -> None:
        saved = await asyncio.to_thread(self._store.load)
        for device_id, (seen_at, state) in saved.items():
            if self._registry.get(device_id) is not None and state in (ONLINE, OFFLINE):
                self._seen_at[device_id] = seen_at
                self._state[device_id] = state
        self._update_gauges()
        log.info("liveness: %d devices seen before, %d never seen",
                 len(self._state), len(self._registry) - len(self._state))

    def replace_registry(self, registry: Registry) -> None:
        self._registry = registry
        self._shortest_interval_s = _shortest_interval_s(registry)
        for device_id in [d for d in self._state if registry.get(d) is None]:
            del self._state[device_id]
            self._seen_at.pop(device_id, None)
        if self._owns is not None:
            self.owned = self._owned_devices(self._owns)
        self._update_gauges()

    # -- the hot path ------------------------------------------------------------------
    def seen(self, device: Device, at: float) -> None:
        self._seen_at[device.device_id] = at
        self._dirty.add(device.device_id)
        if self._adopted:
            self._adopted.discard(device.device_id)
        if self._state.get(device.device_id) != ONLINE:
            self._change(device, ONLINE, at, "uplink received")

    def went_away(self, device: Device, reason: str) -> None:
        """The device said it leaves, or its registration ran out (LwM2M): offline now,
        with `reason`, whatever its report interval says."""
        if self._state.get(device.device_id) == ONLINE:
            self._change(device, OFFLINE, self._seen_at.get(device.device_id, 0.0), reason)

    # -- ownership (cluster.enabled) ---------------------------------------------------
    def owners_changed(self, owns: Callable[[str], bool], now: float) -> None:
        """The live hosts changed: judge only the devices this host owns from now on, and
        give each the full offline window under its new owner. A device this host took
        over and never heard (its state lived on the host that is down) is judged too,
        from now: silent for the window, it goes offline, saying it was taken over."""
        self._owns = owns
        self.owned = self._owned_devices(owns)
        for device_id in self.owned:
            state = self._state.get(device_id)
            if state == ONLINE:
                self._seen_at[device_id] = max(self._seen_at[device_id], now)
            elif state is None:
                self._state[device_id] = ONLINE
                self._seen_at[device_id] = now
                self._adopted.add(device_id)
        self._update_gauges()

    def _owned_devices(self, owns: Callable[[str], bool]) -> set[str]:
        return {device.device_id for device in self._registry if owns(device.device_id)}

    # -- the periodic sweep ------------------------------------------------------------
    def sweep(self, now: float) -> int:
        """Mark silent devices offline; returns how many changed."""
        self._follow_clock_jump(now, time.monotonic())
        changed = 0
        # Only a device unheard for the shortest window can be due: judging each of 40,000
        # cost ~20 ms a sweep, ~3 µs per uplink at 667/s (docs/decisions.md); this filter
        # is a tenth of that.
        cutoff = now - self._shortest_interval_s * self._offline_after
        for device in self._online_devices(
                [d for d, seen_at in self._seen_at.items() if seen_at < cutoff]):
            silent_s = now - self._seen_at[device.device_id]
            if silent_s > device.report_interval_s * self._offline_after:
                reason = (f"no uplink for {silent_s:.0f}s "
                          f"({self._offline_after:g} x {device.report_interval_s}s interval)")
                if device.device_id in self._adopted:
                    self._adopted.discard(device.device_id)
                    reason += " since this host took it over from a host that is down"
                self._change(device, OFFLINE, self._seen_at[device.device_id], reason)
                changed += 1
        if self.owned is not None:
            self._update_gauges()
        return changed

    def _follow_clock_jump(self, wall: float, mono: float) -> None:
        """A wall clock that jumped (NTP stepping a clock that booted wrong, an operator)
        would make every device look silent for the jump, or never silent after a step
        back: last-seen times move with the clock, so silence is measured as it passed."""
        last = self._last_sweep
        self._last_sweep = (wall, mono)
        if last is None:
            return
        jump_s = (wall - last[0]) - (mono - last[1])
        if abs(jump_s) < CLOCK_JUMP_S:
            return
        for device_id in self._seen_at:
            self._seen_at[device_id] += jump_s
        self._dirty.update(self._seen_at)
        log.warning("wall clock jumped %+.0f s since the last liveness sweep: the last-seen "
                    "times of %d devices moved with it, so none is judged by the jump",
                    jump_s, len(self._seen_at))

    def _online_devices(self, device_ids: list[str]) -> Iterator[Device]:
        owned, states = self.owned, self._state
        for device_id in device_ids:
            if states.get(device_id) == ONLINE and (owned is None or device_id in owned):
                device = self._registry.get(device_id)
                if device is not None:
                    yield device

    async def save(self) -> None:
        if not self._dirty:
            return
        rows = [(d, self._seen_at[d], self._state.get(d, ONLINE))
                for d in self._dirty if d in self._seen_at and d not in self._adopted]
        self._dirty = set()
        await asyncio.to_thread(self._store.save, rows)

    # -- state changes -----------------------------------------------------------------
    def _change(self, device: Device, state: str, seen_at: float, reason: str) -> None:
        before = self._state.get(device.device_id, NEVER_SEEN)
        self._state[device.device_id] = state
        self._dirty.add(device.device_id)
        self._metrics.device_state_changes.labels(state).inc()
        self._count(before, -1)
        self._count(state, +1)
        payload = json.dumps({"device_id": device.device_id, "state": state,
                              "last_seen": rfc3339_ms(seen_at), "reason": reason},
                             separators=(",", ":")).encode()
        record = Record(f"{self._topic_base}/{device.device_type}/{device.device_id}/status",
                        payload, retain=True)
        if self._spool.has_room(record_size(record)):
            self._spool.append(record, None)
        else:
            log.warning("spool full: status %s of %s not published", state, device.device_id)
        if state == OFFLINE:
            log.info("device %s offline: %s", device.device_id, reason)

    def _update_gauges(self) -> None:
        """Recount every state (on load and reload; changes adjust the counts in O(1)). In
        a cluster: of the devices this host owns, recounted at each sweep."""
        owned = self.owned
        if owned is None:
            online = sum(1 for s in self._state.values() if s == ONLINE)
            known, devices = len(self._state), len(self._registry)
        else:
            states = [s for d, s in self._state.items() if d in owned]
            online = sum(1 for s in states if s == ONLINE)
            known, devices = len(states), len(owned)
        self._counts = {ONLINE: online, OFFLINE: known - online, NEVER_SEEN: devices - known}
        for state, n in self._counts.items():
            self._metrics.devices.labels(state).set(n)

    def _count(self, state: str, delta: int) -> None:
        self._counts[state] += delta
        self._metrics.devices.labels(state).set(self._counts[state])

    def state_of(self, device_id: str) -> str:
        return self._state.get(device_id, NEVER_SEEN)


def _shortest_interval_s(registry: Registry) -> float:
    return float(min((device.report_interval_s for device in registry), default=0))
