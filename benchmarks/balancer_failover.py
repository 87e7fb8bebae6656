"""How long a dead gateway host's devices go unanswered behind the balancer
(gateway/tools/balancer.py), in a lab: libcoap's server on 3 hosts, the checker in the
balancer namespace, and in the device namespace 60 "devices" (UDP sockets on fixed ports)
each CoAP-pinging the VIP every 20 ms. Each round kills -9 one host's server, waits until the
checker has moved its slots, restarts it and waits until it has them back.

Per round: the checker's view (kill -9 -> its slots on the others; restart -> back), and the
devices' (the longest a device went without an answer, from its own clock). Root.

Run: flock /tmp/nbg-heavy.lock .venv/bin/python benchmarks/balancer_failover.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from gateway.tools import balancer as tool
from gateway.tools.lab.balancer import lab_balancer
from gateway.tools.lab.netns import Lab

DEVICES = 60
# A device of a live host goes unanswered for a ping or two at times (libcoap's server
# answers about every other ping of a quick series); a dead host's, for the detection time.
SILENT_S = 0.4
# In the device namespace: ping the VIP from DEVICES sockets every 20 ms until SIGTERM or
# `seconds` pass; then print each device's longest silence (seconds between answers).
PINGER = """
import json, select, signal, socket, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
vip, seconds, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
socks = []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 42000 + i)); s.setblocking(False); socks.append(s)
last = [time.monotonic()] * n
worst = [0.0] * n
mid = 0
end = time.monotonic() + seconds
while not stop and time.monotonic() < end:
    mid = (mid + 1) % 65536
    for s in socks:
        s.sendto(bytes((0x40, 0, mid >> 8, mid & 0xFF)), (vip, 5683))
    tick = time.monotonic() + 0.02
    while (left := tick - time.monotonic()) > 0:
        ready, _, _ = select.select(socks, [], [], left)
        now = time.monotonic()
        for s in ready:
            while True:
                try:
                    s.recv(64)
                except BlockingIOError:
                    break
                i = socks.index(s)
                worst[i] = max(worst[i], now - last[i]); last[i] = now
print(json.dumps(worst), flush=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--interval", type=float, default=tool.PROBE_INTERVAL_S)
    parser.add_argument("--down-after", type=int, default=tool.DOWN_AFTER_MISSES)
    args = parser.parse_args()
    print(f"checker: a CoAP ping every {args.interval:g} s, down after {args.down_after} "
          f"missed, up after {tool.UP_AFTER_ANSWERS} answered; {DEVICES} devices pinging "
          "the VIP every 20 ms", flush=True)
    with Lab("nbfail", hosts=3, brokers=0, net=None) as lab:
        servers = {h: lab.popen(h, ["coap-server-notls", "-A", lab.host_ip(int(h[1:]))])
                   for h in lab.hosts}
        with lab_balancer(lab, interval_s=args.interval, down_after=args.down_after) as running:
            running.wait_for(set(lab.hosts))
            moved_s, back_s, silence_s = [], [], []
            for r in range(args.rounds):
                victim = lab.hosts[r % len(lab.hosts)]
                pinger = lab.popen("dev", [sys.executable, "-c", PINGER, lab.vip, "60",
                                           str(DEVICES)], log=lab.workdir / f"pinger-{r}.log")
                time.sleep(1.0)  # every device answered before the kill
                killed = time.monotonic()
                lab.kill(servers[victim])
                moved_s.append(running.wait_for(set(lab.hosts) - {victim}))
                servers[victim] = lab.popen(victim, ["coap-server-notls", "-A",
                                                     lab.host_ip(int(victim[1:]))])
                back_s.append(running.wait_for(set(lab.hosts)))
                time.sleep(1.0)
                lab.stop(pinger)  # SIGTERM: it prints its figures and exits
                worst = silence_of(lab, r)
                silent = [w for w in worst if w > SILENT_S]
                others = [w for w in worst if w <= SILENT_S]
                silence_s.append(max(silent, default=0.0))
                print(f"round {r + 1}: kill -9 {victim}: slots moved after {moved_s[-1]:.2f} s; "
                      f"{len(silent)} of {DEVICES} devices unanswered for over {SILENT_S:g} s, "
                      f"the longest {silence_s[-1]:.2f} s (the others' longest gap "
                      f"{max(others, default=0.0):.2f} s); restarted, its slots back after "
                      f"{back_s[-1]:.2f} s ({time.monotonic() - killed:.1f} s round)", flush=True)
    for name, values in (("slots moved after kill -9", moved_s),
                         ("longest unanswered device", silence_s),
                         ("slots back after restart", back_s)):
        print(f"{name:28} median {statistics.median(values):.2f} s, max {max(values):.2f} s "
              f"over {len(values)} rounds")
    return 0


def silence_of(lab: Lab, r: int) -> list[float]:
    lines = (lab.workdir / f"pinger-{r}.log").read_text().splitlines()
    return [float(w) for w in json.loads(lines[-1])]


if __name__ == "__main__":
    raise SystemExit(main())
