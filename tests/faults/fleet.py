"""Devices for the fault suite, and the ledger of what each one was answered.

A device is a UDP endpoint of its own that sends confirmable uplinks and retransmits each
one the RFC 7252 way (same message ID) until it is answered or its time is up. A `Fleet`
runs every device in a thread of its own while a test breaks something, each bounded in
uplinks and in time. The ledger then says whether the gateway kept its promise: every
uplink answered 2.xx, 4.xx or 5.03 with Max-Age, and every 2.04 on MQTT.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiocoap
from aiocoap.numbers.optionnumbers import OptionNumber

from tests.coap_raw import RawCoap, uplink_request
from tests.conftest import DEADLINE_S, DEVICES, Device, Gateway, Subscription, wait_for

SENDERS = [d for d in DEVICES if not d.device_id.startswith("off-")]
READING: dict[str, dict[str, float]] = {
    "env_th": {"temperature": 21.5}, "power_meter": {"voltage": 230.0}, "gas": {"h2": 12.0}}
# A device retransmits after 2-3 s (RFC 7252 ACK_TIMEOUT); the tests compress time.
RETRANSMIT_S = 0.5
# 5.03 from admission control: the event loop ran late (a loaded machine), allowed anywhere.
OVERLOADED = "5.03 'overloaded, retry later'"
SPOOL_ERROR = "5.03 'spool write failed'"
# Device clocks: seconds since the epoch, one second per seq, far from the gateway's clock.
TS_BASE = 1_763_900_000


@dataclass(frozen=True)
class Answer:
    code: aiocoap.numbers.codes.Code
    max_age_s: int | None  # None: no Max-Age option
    diagnostic: bytes

    @property
    def acked(self) -> bool:
        return bool(self.code == aiocoap.CHANGED)

    @property
    def retry_later(self) -> bool:
        return bool(self.code == aiocoap.SERVICE_UNAVAILABLE)

    def kept_promise(self) -> bool:
        """2.xx, 4.xx, or 5.03 with Max-Age: the only answers a device may get."""
        if self.retry_later:
            return self.max_age_s is not None
        return int(self.code) >> 5 in (2, 4)

    def __str__(self) -> str:
        age = f" Max-Age={self.max_age_s}" if self.max_age_s is not None else ""
        return f"{self.code.dotted}{age} {self.diagnostic.decode(errors='replace')!r}"


def answer_of(reply: aiocoap.Message) -> Answer:
    max_age = reply.opt.get_option(OptionNumber.MAX_AGE)
    return Answer(reply.code, int(max_age[0].value) if max_age else None, reply.payload)


class DeviceClient:
    """One device on a socket of its own."""

    def __init__(self, gw: Gateway, device: Device) -> None:
        self.device = device
        self._uri = gw.uri(device)
        self._coap = RawCoap(gw.coap_port)

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._coap.sock.close()

    def uplink(self, seq: int, ts: int | None = None, within_s: float = 5.0) -> Answer | None:
        """Send one reading; retransmit it until answered. None: no answer within `within_s`."""
        body: dict[str, Any] = {"seq": seq, **READING[self.device.device_type]}
        if ts is not None:
            body["ts"] = ts
        request = uplink_request(self._uri, json.dumps(body).encode())
        deadline = time.monotonic() + within_s
        while (left := deadline - time.monotonic()) > 0:
            self._coap.send(request)
            reply = self._reply_to(request, min(RETRANSMIT_S, left))
            if reply is not None:
                return answer_of(reply)
        return None

    def _reply_to(self, request: aiocoap.Message, timeout_s: float) -> aiocoap.Message | None:
        until = time.monotonic() + timeout_s
        while (left := until - time.monotonic()) > 0:
            try:
                reply = self._coap.receive(left)
            except TimeoutError:
                return None
            if reply.token == request.token:  # a late answer to an earlier one is dropped
                return reply
        return None


# -- the ledger -------------------------------------------------------------------------
@dataclass
class Ledger:
    """Every answer each (device, seq) got, in order; None for no answer in time."""

    answers: dict[tuple[str, int], list[Answer | None]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, device_id: str, seq: int, answer: Answer | None) -> None:
        with self._lock:
            self.answers.setdefault((device_id, seq), []).append(answer)

    def _items(self) -> list[tuple[tuple[str, int], list[Answer | None]]]:
        with self._lock:
            return [(key, list(got)) for key, got in self.answers.items()]

    def sent(self) -> int:
        return sum(len(got) for _, got in self._items())

    def acked(self) -> dict[str, set[int]]:
        by_device: dict[str, set[int]] = {}
        for (device_id, seq), got in self._items():
            if any(a is not None and a.acked for a in got):
                by_device.setdefault(device_id, set()).add(seq)
        return by_device

    def acked_count(self) -> int:
        return sum(len(seqs) for seqs in self.acked().values())

    def unanswered(self) -> list[tuple[str, int]]:
        return [key for key, got in self._items() if any(a is None for a in got)]

    def gave_up(self) -> Counter[str]:
        """How often each device had no answer in time, by device."""
        return Counter(device_id for (device_id, _), got in self._items()
                       for answer in got if answer is None)

    def broken_promises(self) -> list[str]:
        return [f"{d} seq {s}: {a}" for (d, s), got in self._items()
                for a in got if a is not None and not a.kept_promise()]

    def codes(self) -> Counter[str]:
        return Counter(a.code.dotted if a is not None else "none"
                       for _, got in self._items() for a in got)

    def refusals(self) -> set[str]:
        """What every answer but 2.04 said: `5.03 'spool write failed'`."""
        return {f"{a.code.dotted} {a.diagnostic.decode(errors='replace')!r}"
                for _, got in self._items() for a in got if a is not None and not a.acked}

    def max_ages(self) -> set[int | None]:
        return {a.max_age_s for _, got in self._items() for a in got
                if a is not None and a.retry_later}


def delivered(sub: Subscription) -> dict[str, set[int]]:
    """(device, seq) the witness has seen, by device."""
    by_device: dict[str, set[int]] = {}
    for message in sub.messages("/up"):
        by_device.setdefault(message["device_id"], set()).add(message["seq"])
    return by_device


def missing(acked: dict[str, set[int]], *subs: Subscription) -> dict[str, set[int]]:
    """Acked seqs no witness has seen (yet), by device."""
    seen: dict[str, set[int]] = {}
    for sub in subs:
        for device_id, seqs in delivered(sub).items():
            seen.setdefault(device_id, set()).update(seqs)
    gaps = {d: seqs - seen.get(d, set()) for d, seqs in acked.items()}
    return {d: gap for d, gap in gaps.items() if gap}


# -- a fleet sending while something breaks ----------------------------------------------
class Fleet:
    """Each device in a thread of its own sends its next reading, keeps a reading that got
    5.03 or no answer for the next try (as a device does), and stops after `max_uplinks`
    sends, `max_s` seconds, or `stop()`. `pause_s` between sends keeps the load modest on
    a shared machine. Use as a context manager: leaving it stops and joins the threads."""

    def __init__(self, gw: Gateway, ledger: Ledger, devices: list[Device] | None = None, *,
                 first_seq: int = 1, max_uplinks: int = 400, max_s: float = 30.0,
                 within_s: float = 5.0, pause_s: float = 0.01) -> None:
        self._gw = gw
        self._ledger = ledger
        self._devices = devices if devices is not None else SENDERS
        self._first_seq = first_seq
        self._max_uplinks, self._max_s = max_uplinks, max_s
        self._within_s, self._pause_s = within_s, pause_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.next_seq: dict[str, int] = {d.device_id: first_seq for d in self._devices}

    def __enter__(self) -> Fleet:
        for device in self._devices:
            thread = threading.Thread(target=self._run, args=(device,), daemon=True,
                                      name=f"device-{device.device_id}")
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self._within_s + 5)
        if any(t.is_alive() for t in self._threads):
            raise RuntimeError("a device thread did not stop")

    def done(self) -> bool:
        return not any(t.is_alive() for t in self._threads)

    def _run(self, device: Device) -> None:
        deadline = time.monotonic() + self._max_s
        seq = self._first_seq
        with DeviceClient(self._gw, device) as client:
            for _ in itertools.repeat(None, self._max_uplinks):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                answer = client.uplink(seq, TS_BASE + seq, self._within_s)
                self._ledger.note(device.device_id, seq, answer)
                if answer is not None and not answer.retry_later:
                    seq += 1
                    self.next_seq[device.device_id] = seq
                self._stop.wait(self._pause_s)


def wait_grows(value: Callable[[], float], by: float, what: str,
               timeout: float = DEADLINE_S) -> None:
    """Poll until `value()` has grown by `by` from what it is now."""
    start = value()
    wait_for(lambda: value() >= start + by, timeout, what)
