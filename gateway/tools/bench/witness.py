"""The fleet bench's and the soak's witness: mosquitto_sub on the bench's uplink topics,
read as a stream in a thread, recording which uplinks reached the broker (one bit each,
so an hours-long soak needs no file of every message) and the messages' mean size.

Each run registers the seq range its load generator uses (`track`), so one witness serves
every run against one gateway. It only counts: the load generator's acked slots are
checked against it by the caller.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway.tools.bench.openload import SlotSet
from gateway.tools.localstack import LOOPBACK, StackError

TOPICS = "nbiot/bench/+/+/up"
PROBE_TOPIC = "nbiot-bench-witness/probe"
SEQ_SPAN = 1_000_000  # seqs each tracked run may use, from its seq_base + 1
_DEVICE = re.compile(rb'"device_id":"bench-(\d+)"')
_SEQ = re.compile(rb'"seq":(\d+)')


@dataclass
class Tally:
    """What the witness saw of one run's uplinks (slot = (seq - seq_base - 1) * devices
    + device index, as gateway.tools.bench.openload.Schedule numbers them)."""

    seq_base: int
    devices: int
    delivered: SlotSet = field(default_factory=SlotSet)
    messages: int = 0
    duplicates: int = 0
    message_bytes: int = 0  # topic + payload

    @property
    def mean_message_bytes(self) -> float:
        return self.message_bytes / self.messages if self.messages else 0.0


class StreamWitness:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self._lock = threading.Lock()
        self._tallies: list[Tally] = []
        self._probes = 0
        self._unparsed = 0
        self._thread = threading.Thread(target=self._read, name="witness", daemon=True)
        self._thread.start()

    def track(self, seq_base: int, devices: int) -> Tally:
        tally = Tally(seq_base, devices)
        with self._lock:
            self._tallies.append(tally)
        return tally

    def missing(self, tally: Tally, acked: SlotSet) -> int:
        """Acked slots of `tally`'s run the broker has not delivered (yet)."""
        with self._lock:
            return acked.missing_from(tally.delivered)

    def wait_delivered(self, tally: Tally, acked: SlotSet, timeout_s: float) -> int:
        """Poll until every acked slot was delivered or `timeout_s` passed; the number
        still missing (lost, when the spool has drained)."""
        deadline = time.monotonic() + timeout_s
        while True:
            missing = self.missing(tally, acked)
            if not missing or time.monotonic() > deadline or self._proc.poll() is not None:
                return missing
            time.sleep(0.1)

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            topic, _, payload = line.rstrip(b"\n").partition(b" ")
            if topic == PROBE_TOPIC.encode():
                with self._lock:
                    self._probes += 1
                continue
            device, seq = _DEVICE.search(payload), _SEQ.search(payload)
            if device is None or seq is None:
                self._unparsed += 1
                continue
            self._count(int(device.group(1)), int(seq.group(1)), len(topic) + len(payload))

    def _count(self, device: int, seq: int, size: int) -> None:
        with self._lock:
            for tally in self._tallies:
                if tally.seq_base < seq <= tally.seq_base + SEQ_SPAN:
                    slot = (seq - tally.seq_base - 1) * tally.devices + device
                    if slot in tally.delivered:
                        tally.duplicates += 1
                    else:
                        tally.delivered.add(slot)
                    tally.messages += 1
                    tally.message_bytes += size
                    return

    def probes_seen(self) -> int:
        with self._lock:
            return self._probes


@contextlib.contextmanager
def stream_witness(broker_port: int, log_path: Path, timeout_s: float = 20.0
                   ) -> Iterator[StreamWitness]:
    """mosquitto_sub (QoS 1) on the bench topics, ready once a probe it subscribed to has
    come back through the broker; stopped on exit."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            ["mosquitto_sub", "-h", LOOPBACK, "-p", str(broker_port), "-q", "1", "-v",
             "-t", TOPICS, "-t", PROBE_TOPIC], stdout=subprocess.PIPE, stderr=log,
            start_new_session=True)
    try:
        witness = StreamWitness(proc)
        deadline = time.monotonic() + timeout_s
        while not witness.probes_seen():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"mosquitto_sub did not come up (see {log_path})")
            subprocess.run(["mosquitto_pub", "-h", LOOPBACK, "-p", str(broker_port),
                            "-t", PROBE_TOPIC, "-m", "probe"], check=True, timeout=5)
            poll_until = time.monotonic() + 0.5
            while not witness.probes_seen() and time.monotonic() < poll_until:
                time.sleep(0.02)
        yield witness
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
