"""`gateway.workers = 2`: two worker processes behind one supervisor share the CoAP port
(SO_REUSEPORT). Every device belongs to one worker, which holds its reply cache, replay
window, liveness and downlink queue; a datagram the kernel hands to the other worker is
forwarded to the owner. Metrics are merged on the supervisor's one endpoint.

The figures these tests compare come from real processes: the gateway's, mosquitto's,
and /proc (the supervisor's children)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiocoap
import pytest

from gateway.runtime.workers import owner
from tests.coap_raw import RawCoap, uplink_request
from tests.conftest import Broker, Gateway, Subscription, free_port, wait_for
from tests.test_dtls import READING, coaps_client, coaps_toml

WORKERS = 2
DEVICE_COUNT = 24
DEVICES = [f"w-{i:02d}" for i in range(DEVICE_COUNT)]


def devices_of(worker: int) -> list[str]:
    return [d for d in DEVICES if owner(d, WORKERS) == worker]


def start_workers(factory: Callable[..., Gateway], workers: int = WORKERS, **env: str
                  ) -> Gateway:
    gw = factory(start=False, NBIOT_GATEWAY__WORKERS=str(workers), **env)
    rows = ["device_id,type,token,report_interval_s,enabled"]
    rows += [f"{d},env_th,tok-{d},60,true" for d in DEVICES]
    (gw.workdir / "devices.csv").write_text("\n".join(rows) + "\n")
    gw.start()
    return gw


def uri(gw: Gateway, device_id: str) -> str:
    return f"coap://127.0.0.1:{gw.coap_port}/up/{device_id}?k=tok-{device_id}"


def send(gw: Gateway, device_id: str, seq: int, sock: RawCoap | None = None) -> aiocoap.Message:
    request = uplink_request(uri(gw, device_id), {"seq": seq, "temperature": 20.0 + seq})
    if sock is not None:
        return sock.exchange(request)
    with RawCoap(gw.coap_port) as device:
        return device.exchange(request)


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()]


def published(sub: Subscription) -> list[tuple[str, int]]:
    return sorted((m["device_id"], m["seq"]) for m in sub.messages())


def test_workers_share_the_port_and_publish_every_uplink_once(
    gateway_factory: Callable[..., Gateway], subscribe: Callable[[str], Subscription]
) -> None:
    assert devices_of(0) and devices_of(1)  # the hash gives each worker some devices
    sub = subscribe("nbiot/#")
    gw = start_workers(gateway_factory)
    assert gw.proc is not None
    assert len(children(gw.proc.pid)) == WORKERS

    # Each exchange from a socket of its own: the kernel spreads them over both workers.
    replies = [send(gw, d, seq) for seq in (1, 2) for d in DEVICES]

    assert {r.code for r in replies} == {aiocoap.CHANGED}
    sub.wait_count(2 * DEVICE_COUNT)
    assert published(sub) == sorted((d, s) for d in DEVICES for s in (1, 2))
    assert gw.metric("nbiot_gateway_workers") == WORKERS
    assert gw.metric("nbiot_gateway_workers_up") == WORKERS
    assert gw.metric("nbiot_gateway_uplinks_accepted_total") == 2 * DEVICE_COUNT
    assert gw.metric("nbiot_gateway_registry_devices") == DEVICE_COUNT  # each its share
    # About half the datagrams arrive at the worker that does not own the device.
    assert 0 < gw.metric("nbiot_gateway_worker_forwarded_datagrams_total") < 2 * DEVICE_COUNT
    assert gw.metric("nbiot_gateway_mqtt_connected") == 1
    with open(gw.log_path) as log:
        text = log.read()
    assert "worker=0" in text and "worker=1" in text


def test_a_retransmission_from_new_ports_is_published_once(
    gateway_factory: Callable[..., Gateway], subscribe: Callable[[str], Subscription]
) -> None:
    """NAT rebinding: the same (device, seq) from 16 source ports. The kernel hashes them
    over both workers; only the owner's replay window may decide, so one is published."""
    sub = subscribe("nbiot/#")
    gw = start_workers(gateway_factory)
    device = DEVICES[0]
    sockets = [RawCoap(gw.coap_port) for _ in range(16)]
    try:
        replies = [send(gw, device, 1, s) for s in sockets]
        barrier = send(gw, device, 2)
    finally:
        for s in sockets:
            s.sock.close()
    assert {r.code for r in replies} == {aiocoap.CHANGED} and barrier.code == aiocoap.CHANGED
    messages = sub.wait_count(2)
    while 2 not in [m["seq"] for m in messages]:
        messages = sub.wait_count(len(messages) + 1)
    assert published(sub) == [(device, 1), (device, 2)]
    assert gw.metric("nbiot_gateway_uplinks_duplicate_total") == 15
    assert gw.metric("nbiot_gateway_worker_forwarded_datagrams_total") > 0


def test_a_command_reaches_a_device_owned_by_the_other_worker(
    gateway_factory: Callable[..., Gateway], broker: Broker,
    subscribe: Callable[[str], Subscription]
) -> None:
    """Worker 0 alone subscribes to commands; worker 1's device gets its own, stored by
    worker 1 before worker 0 acknowledges it to the broker."""
    gw = start_workers(gateway_factory)
    device = devices_of(1)[0]
    down = f"nbiot/plant/env_th/{device}/down"
    acks = subscribe(f"{down}/ack")
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                    "-t", down, "-m", json.dumps({"id": "c1", "set": {"x": 1}})],
                   check=True, timeout=10)
    assert [m["state"] for m in acks.wait_count(1, "/down/ack")] == ["queued"]

    carrying = send(gw, device, 1)

    assert carrying.code == aiocoap.CHANGED
    assert json.loads(carrying.payload) == {"id": "c1", "set": {"x": 1}, "pending": 0}
    assert command_rows(gw, "downlink.w1.sqlite") == [(device, "c1")]  # stored by its owner
    assert command_rows(gw, "downlink.w0.sqlite") == []


def command_rows(gw: Gateway, name: str) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(gw.workdir / name)) as db:
        return db.execute("SELECT device_id, command_id FROM commands").fetchall()


def test_sigterm_stops_every_worker_and_exits_0(gateway_factory: Callable[..., Gateway]) -> None:
    gw = start_workers(gateway_factory)
    assert gw.proc is not None
    pids = children(gw.proc.pid)
    send(gw, DEVICES[0], 1)

    assert gw.stop(signal.SIGTERM) == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()


def test_a_dead_worker_stops_the_gateway_and_nothing_acked_is_lost(
    gateway_factory: Callable[..., Gateway], broker: Broker,
    subscribe: Callable[[str], Subscription]
) -> None:
    """kill -9 of one worker, with the broker down: the supervisor stops the other and
    exits 1 (systemd restarts it); after a restart, every acked uplink is published."""
    gw = start_workers(gateway_factory)
    assert gw.proc is not None
    broker.stop()
    replies = [send(gw, d, 1) for d in DEVICES]
    assert {r.code for r in replies} == {aiocoap.CHANGED}

    os.kill(children(gw.proc.pid)[1], signal.SIGKILL)
    assert gw.proc.wait(60) == 1
    gw.proc = None
    assert "exited unexpectedly" in gw.log_path.read_text()

    broker.start()
    sub = subscribe("nbiot/#")
    gw.start()
    sub.wait_count(DEVICE_COUNT)
    assert published(sub) == sorted((d, 1) for d in DEVICES)


def test_changing_the_worker_count_keeps_spooled_uplinks_and_replay_state(
    gateway_factory: Callable[..., Gateway], broker: Broker,
    subscribe: Callable[[str], Subscription]
) -> None:
    """Two workers spool with the broker down; the gateway restarts with one worker (and
    then three): every record is published, and an old seq is still a duplicate."""
    gw = start_workers(gateway_factory)
    broker.stop()
    assert {send(gw, d, 7).code for d in DEVICES} == {aiocoap.CHANGED}
    assert gw.stop() == 0
    assert list(gw.workdir.glob("spool.w*.sqlite"))

    broker.start()
    sub = subscribe("nbiot/#")
    gw.env_extra["NBIOT_GATEWAY__WORKERS"] = "1"
    gw.start()
    sub.wait_count(DEVICE_COUNT)
    assert not list(gw.workdir.glob("spool.w*.sqlite"))
    retried = send(gw, DEVICES[3], 7)  # a device retrying after the restart
    assert retried.code == aiocoap.CHANGED
    assert gw.metric("nbiot_gateway_uplinks_duplicate_total") == 1
    assert gw.stop() == 0

    gw.env_extra["NBIOT_GATEWAY__WORKERS"] = "3"
    gw.start()
    assert send(gw, DEVICES[5], 7).code == aiocoap.CHANGED
    assert gw.metric("nbiot_gateway_uplinks_duplicate_total") == 1
    assert send(gw, DEVICES[5], 8).code == aiocoap.CHANGED
    sub.wait_count(DEVICE_COUNT + 1)
    time.sleep(0.5)  # a wrongly forwarded duplicate would arrive with seq 8
    assert published(sub) == sorted([(d, 7) for d in DEVICES] + [(DEVICES[5], 8)])


def worker_pids(gw: Gateway, workers: int) -> list[int]:
    """The workers' pids in worker order, from the supervisor's latest start line."""
    starts = re.findall(rf"started {workers} workers \(pids ([\d, ]+)\)", gw.log_path.read_text())
    return [int(pid) for pid in starts[-1].split(", ")]


def test_a_backlog_moved_to_three_workers_is_published_in_each_devices_order(
    gateway_factory: Callable[..., Gateway], broker: Broker,
    subscribe: Callable[[str], Subscription]
) -> None:
    """Two workers spool seq 1-3 of every device with the broker down; the gateway restarts
    with three and spools seq 4. The broker comes back while worker 0 is held (SIGSTOP), so
    a record moved to the wrong worker would arrive after its device's later ones: every
    device's uplinks arrive as 1, 2, 3, 4."""
    gw = start_workers(gateway_factory)
    broker.stop()
    assert {send(gw, d, seq).code for seq in (1, 2, 3) for d in DEVICES} == {aiocoap.CHANGED}
    assert gw.stop() == 0
    gw.env_extra["NBIOT_GATEWAY__WORKERS"] = "3"
    gw.start()
    assert "state moved from 2 workers to 3: 96 records" in gw.log_path.read_text()
    assert {send(gw, d, 4).code for d in DEVICES} == {aiocoap.CHANGED}
    pids = worker_pids(gw, 3)
    for pid in pids:  # none may publish before the witness listens
        os.kill(pid, signal.SIGSTOP)
    try:
        broker.start()
        sub = subscribe("nbiot/#")
        for pid in pids[1:]:
            os.kill(pid, signal.SIGCONT)
        theirs = {d for d in DEVICES if owner(d, 3) != 0}
        wait_for(lambda: {m["device_id"] for m in sub.messages() if m["seq"] == 4} >= theirs,
                 what="seq 4 of workers 1 and 2's devices")
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    sub.wait_count(4 * DEVICE_COUNT)
    seqs: dict[str, list[int]] = {}
    for message in sub.messages():
        seqs.setdefault(message["device_id"], []).append(message["seq"])
    assert seqs == {d: [1, 2, 3, 4] for d in DEVICES}


@pytest.mark.parametrize("plain_coap", ["true", "false"])
def test_coaps_uplinks_of_either_workers_devices_are_judged_by_their_owner(
    gateway_factory: Callable[..., Gateway], subscribe: Callable[[str], Subscription],
    tmp_path: Path, plain_coap: str
) -> None:
    """DTLS sessions live in worker 0; an uplink of worker 1's device goes to worker 1's
    pipeline and its verdict comes back into the session. A wrong key is still refused.
    With plain CoAP off, worker 1 serves only those: it still counts as ready."""
    coaps_port = free_port(socket.SOCK_DGRAM)
    gw = gateway_factory(coaps_toml(coaps_port), start=False, NBIOT_GATEWAY__WORKERS="2",
                         NBIOT_COAP__ENABLED=plain_coap)
    mine, theirs = devices_of(0)[0], devices_of(1)[0]
    keys = {d: f"{d} secret".encode() for d in (mine, theirs)}
    rows = ["device_id,type,token,report_interval_s,enabled,psk"]
    rows += [f"{d},env_th,tok-{d},60,true,{keys[d].hex() if d in keys else ''}" for d in DEVICES]
    (gw.workdir / "devices.csv").write_text("\n".join(rows) + "\n")
    gw.start()
    sub = subscribe("nbiot/#")

    results = [coaps_client(tmp_path, f"coaps://127.0.0.1:{coaps_port}/up/{d}", d, keys[d],
                            READING % 1) for d in (mine, theirs)]
    refused = coaps_client(tmp_path, f"coaps://127.0.0.1:{coaps_port}/up/{theirs}", theirs,
                           b"wrong key", READING % 2)

    assert [r.responses for r in results] == [[("ACK", "2.04")]] * 2, results[1].output
    assert refused.responses == [], refused.output
    sub.wait_count(2)
    assert sorted((m["device_id"], m["seq"], m["transport"]) for m in sub.messages()) == sorted(
        [(mine, 1, "coaps"), (theirs, 1, "coaps")])
    assert gw.metric("nbiot_gateway_uplinks_accepted_total") == 2
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/readyz", timeout=5) as r:
        assert r.status == 200


def test_port_zero_means_one_port_for_every_worker(
    gateway_factory: Callable[..., Gateway]
) -> None:
    gw = start_workers(gateway_factory, NBIOT_COAP__PORT="0")
    started = re.search(r"started 2 workers .* port (\d+)", gw.log_path.read_text())
    assert started is not None and started.group(1) != "0"
    gw.coap_port = int(started.group(1))
    assert {send(gw, d, 1).code for d in DEVICES} == {aiocoap.CHANGED}


def test_a_stuck_worker_is_reported_and_stops_the_watchdog_but_not_the_gateway(
    gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    """SIGSTOP one worker for 12 s: /metrics says 1 of 2 workers up, the supervisor stops
    pinging systemd's watchdog (which would restart the service), and nothing exits; after
    SIGCONT both answer and the pings come back."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.2)
    try:
        check_stuck_worker(gateway_factory, notify, tmp_path)
    finally:
        notify.close()


def check_stuck_worker(gateway_factory: Callable[..., Gateway], notify: socket.socket,
                       tmp_path: Path) -> None:
    gw = start_workers(gateway_factory, NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
                       WATCHDOG_USEC="2000000")
    assert gw.proc is not None

    def pings(seconds: float) -> int:
        count, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                count += notify.recv(4096).count(b"WATCHDOG=1")
        return count

    assert pings(2.5) >= 1
    stuck = children(gw.proc.pid)[1]
    os.kill(stuck, signal.SIGSTOP)
    try:
        assert gw.metric("nbiot_gateway_workers_up") == 1
        time.sleep(9)  # past the supervisor's patience: 10 s without an answer
        pings(0.5)  # those sent before, still queued in the socket
        assert pings(3) == 0
        assert gw.proc.poll() is None
    finally:
        os.kill(stuck, signal.SIGCONT)
    assert gw.metric("nbiot_gateway_workers_up") == 2
    assert pings(2.5) >= 1
    assert gw.proc.poll() is None and "exited" not in gw.log_path.read_text()


def test_an_oversized_command_for_another_workers_device_is_rejected_and_acked(
    gateway_factory: Callable[..., Gateway], broker: Broker,
    subscribe: Callable[[str], Subscription]
) -> None:
    gw = start_workers(gateway_factory)
    device = devices_of(1)[0]
    down = f"nbiot/plant/env_th/{device}/down"
    acks = subscribe(f"{down}/ack")
    big = json.dumps({"id": "huge", "pad": "x" * 300_000})
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                    "-t", down, "-s"], input=big.encode(), check=True, timeout=10)
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                    "-t", down, "-m", json.dumps({"id": "small"})], check=True, timeout=10)

    states = [(m["id"], m["state"]) for m in acks.wait_count(2, "/down/ack")]
    assert states == [("huge", "rejected"), ("small", "queued")]  # the queue moved on
    assert json.loads(send(gw, device, 1).payload)["id"] == "small"


def test_the_port_held_by_another_process_is_refused(
    gateway_factory: Callable[..., Gateway]
) -> None:
    """SO_REUSEPORT must not let the workers join a group another process made."""
    gw = gateway_factory(start=False, NBIOT_GATEWAY__WORKERS="2")
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", gw.coap_port))
    try:
        done = subprocess.run([sys.executable, "-m", "gateway", "run", "--config",
                               str(gw.config_path)], capture_output=True, text=True,
                              timeout=60, cwd=gw.workdir)
    finally:
        holder.close()
    assert done.returncode == 1
    assert f"cannot bind udp 127.0.0.1 port {gw.coap_port}" in done.stderr


def test_sighup_reloads_every_worker_before_ready(
    gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    """The supervisor asks each worker to reload and tells systemd READY=1 only once all
    have: a device added to the registry is known to its owner when READY=1 arrives."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(10)
    try:
        gw = start_workers(gateway_factory, NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
        assert gw.proc is not None
        added = [f"new-{i}" for i in range(6)]  # some for each worker
        assert {owner(d, WORKERS) for d in added} == {0, 1}
        with open(gw.workdir / "devices.csv", "a") as registry:
            registry.writelines(f"{d},env_th,tok-{d},60,true\n" for d in added)
        while b"READY=1" not in (ready := notify.recv(4096)):
            pass  # the start's own READY, with the first STATUS
        assert re.fullmatch(rb"READY=1\nSTATUS=running: \d+\.\d uplinks/s, broker \w+, spool "
                            rb"\d+ records, .+, 2 of 2 workers answering", ready), ready
        gw.proc.send_signal(signal.SIGHUP)
        messages = []
        while not messages or b"READY=1" not in messages[-1]:
            messages.append(notify.recv(4096))
        assert any(m.startswith(b"RELOADING=1\nMONOTONIC_USEC=") for m in messages)
        assert {send(gw, d, 1).code for d in added} == {aiocoap.CHANGED}
        assert gw.log_path.read_text().count("reloaded registry") == WORKERS
    finally:
        notify.close()


def test_kill_9_of_the_supervisor_stops_the_workers_and_nothing_acked_is_lost(
    gateway_factory: Callable[..., Gateway], broker: Broker,
    subscribe: Callable[[str], Subscription]
) -> None:
    """The workers notice the supervisor's control line close, drain and exit; the lock is
    free again and a new start publishes everything they acknowledged."""
    gw = start_workers(gateway_factory)
    assert gw.proc is not None
    workers = children(gw.proc.pid)
    broker.stop()
    assert {send(gw, d, 1).code for d in DEVICES} == {aiocoap.CHANGED}

    gw.kill()
    for pid in workers:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived its supervisor"

    broker.start()
    sub = subscribe("nbiot/#")
    gw.start()
    sub.wait_count(DEVICE_COUNT)
    assert published(sub) == sorted((d, 1) for d in DEVICES)


def test_a_sighup_during_a_reload_is_not_lost(gateway_factory: Callable[..., Gateway]) -> None:
    gw = start_workers(gateway_factory)
    assert gw.proc is not None
    registry = gw.workdir / "devices.csv"
    with open(registry, "a") as rows:  # a registry that takes a while to read
        rows.writelines(f"bulk-{i},env_th,tok,60,true\n" for i in range(30_000))
    first, second = [f"first-{i}" for i in range(4)], [f"second-{i}" for i in range(4)]
    for added in (first, second):  # the second SIGHUP lands while the first one runs
        with open(registry, "a") as rows:
            rows.writelines(f"{d},env_th,tok-{d},60,true\n" for d in added)
        gw.proc.send_signal(signal.SIGHUP)
        time.sleep(0.03)
    deadline = time.monotonic() + 30
    while gw.log_path.read_text().count("reloaded registry") < 2 * WORKERS:
        assert time.monotonic() < deadline, "both reloads in both workers"
        time.sleep(0.05)
    # Reading 30,000 rows stalls a worker's loop: its lag monitor may answer 5.03 with
    # Max-Age for a moment after, and a device retries. A device missed by a reload would
    # get 4.04 every time.
    def answer(device_id: str) -> aiocoap.numbers.Code | None:
        code = send(gw, device_id, 1).code
        return None if code == aiocoap.SERVICE_UNAVAILABLE else code

    codes = {d: wait_for(lambda d=d: answer(d), what=f"{d} answered") for d in first + second}
    assert set(codes.values()) == {aiocoap.CHANGED}, codes


def test_a_coaps_uplink_whose_owner_does_not_answer_gets_5_03(
    gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    """Worker 1 stopped (SIGSTOP): worker 0 holds the DTLS session and answers 5.03 with
    Max-Age after 10 s rather than leaving the device without an answer. (Over coaps,
    aiocoap's server sends an empty ACK first: the known cost of its stack.)"""
    coaps_port = free_port(socket.SOCK_DGRAM)
    gw = gateway_factory(coaps_toml(coaps_port), start=False, NBIOT_GATEWAY__WORKERS="2")
    theirs = devices_of(1)[0]
    rows = ["device_id,type,token,report_interval_s,enabled,psk"]
    rows += [f"{d},env_th,tok-{d},60,true,{b'key'.hex() if d == theirs else ''}"
             for d in DEVICES]
    (gw.workdir / "devices.csv").write_text("\n".join(rows) + "\n")
    gw.start()
    assert gw.proc is not None
    stuck = children(gw.proc.pid)[1]
    os.kill(stuck, signal.SIGSTOP)
    try:
        result = coaps_client(tmp_path, f"coaps://127.0.0.1:{coaps_port}/up/{theirs}", theirs,
                              b"key", READING % 1, "-B", "20")
    finally:
        os.kill(stuck, signal.SIGCONT)
    # aiocoap sends an empty ACK after 0.1 s, then the 5.03 as a separate response.
    assert re.search(r"^v:1 t:(ACK|CON) c:5\.03 .*Max-Age:5\b", result.output, re.M), \
        result.output
