"""`gateway.workers = N` (N > 1): the parent process that forks the workers and speaks for
them to systemd and Prometheus.

Before the fork it binds N UDP sockets to the CoAP port with SO_REUSEPORT (so the kernel
spreads datagrams over the workers, and `port = 0` still means one port for all) and makes
the workers' inboxes (gateway/runtime/siblings.py) and control lines (gateway/runtime/control.py). Then:
READY=1 once every worker has started, the watchdog ping and STATUS from its own loop, one
`/metrics` (the workers' expositions merged), `/healthz` and `/readyz`; SIGHUP becomes a
`reload` request to each worker (READY=1 once all have answered), SIGTERM is passed on.
A worker that dies unexpectedly makes it stop the others and exit 1: systemd restarts
the whole service, and every worker's spool holds what it acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.config import Settings
from gateway.ingest.coap.server import bind_udp
from gateway.runtime.control import WorkerLine
from gateway.runtime.metrics import MetricsServer
from gateway.runtime.metrics_merge import merge
from gateway.runtime.notify import Notifier, UplinkRate, reloading_message, status_line
from gateway.runtime.service import STOP_AND_RELOAD, Service
from gateway.runtime.workers import WorkerLinks
from gateway.waiting import first_of

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
ASK_TIMEOUT_S = 2.0  # a scrape waits this long for a stuck worker (Prometheus: 10 s)
STATUS_REFRESH_S = 5.0
RELOAD_TIMEOUT_S = 60.0
KILL_AFTER_S = 60.0  # past shutdown_grace_s: a worker that still has not exited is killed


def run(settings: Settings, config_path: Path | None) -> int:
    """Fork the workers and supervise them; the process's exit code."""
    n = settings.gateway.workers
    udp: list[socket.socket | None] = [None] * n
    if settings.coap.enabled:
        udp = list(_bind_shared(settings.coap.bind, settings.coap.port, n))
    inboxes, outboxes = zip(*(socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                              for _ in range(n)), strict=True)
    ours, theirs = zip(*(socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                         for _ in range(n)), strict=True)
    pids = []
    for k in range(n):
        links = WorkerLinks(k, n, udp[k], inboxes[k], list(outboxes), theirs[k])
        others = [s for s in (*udp, *inboxes, *theirs, *ours)
                  if s is not None and s not in (links.udp, links.inbox, links.control)]
        pid = os.fork()
        if pid == 0:
            os._exit(_worker_main(settings, config_path, links, others))
        pids.append(pid)
    where = (f"udp {settings.coap.bind} port {udp[0].getsockname()[1]}" if udp[0] is not None
             else "coaps only, in worker 0")
    for sock in (*udp, *inboxes, *outboxes, *theirs):
        if sock is not None:
            sock.close()
    log.info("started %d workers (pids %s) on %s", n, ", ".join(map(str, pids)), where)
    import uvloop

    supervisor = Supervisor(settings, pids, [WorkerLine(k, s) for k, s in enumerate(ours)])
    return uvloop.run(supervisor.run())


def _bind_shared(host: str, port: int, n: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        if port:
            # SO_REUSEPORT would let us join another process's group on this port (another
            # gateway, with other state: duplicates forwarded twice). A plain bind fails
            # if anyone holds the port.
            bind_udp(host, port).close()
        for _ in range(n):
            socks.append(bind_udp(host, port, reuse_port=True))
            port = socks[0].getsockname()[1]  # port 0: the one the kernel chose, for all
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def _worker_main(settings: Settings, config_path: Path | None, links: WorkerLinks,
                 others: list[socket.socket]) -> int:
    """The forked child: one worker's Service, and nothing of the parent's."""
    # Held until the service has its handlers (gateway/runtime/service.py): a stop or reload passed
    # on while the worker starts must not kill it with the default action.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_AND_RELOAD)
    for sock in others:
        sock.close()
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):  # the supervisor's own
        os.environ.pop(var, None)
    from gateway.runtime.logs import setup_logging
    from gateway.store.spool import SpoolError

    setup_logging(settings.gateway.log_level, links.index)
    import uvloop

    try:
        return uvloop.run(Service(settings, config_path, links).run())
    except (SpoolError, OSError) as e:
        log.error("cannot start worker %d: %s", links.index, e)
    except BaseException:  # anything else: say what, and exit non-zero
        log.exception("worker %d failed", links.index)
    finally:
        sys.stderr.flush()
    return 1


class Supervisor:
    def __init__(self, settings: Settings, pids: list[int], lines: list[WorkerLine]) -> None:
        self._settings = settings
        self._pids = pids
        self._lines = lines
        self._exit_codes: dict[int, int] = {}  # worker index -> exit code
        self._exited = asyncio.Event()
        self._stop = asyncio.Event()
        self._stopping = False
        self._status = "STATUS=starting workers"
        self._last_metrics: dict[int, bytes] = {}  # worker -> its last exposition
        self._figures: dict[str, float] = {}  # unlabelled samples of the last merge
        self._uplink_rate = UplinkRate()
        self._notifier = Notifier(lambda: self._status, alive=self._workers_answer)
        self._reloading: asyncio.Task[None] | None = None
        self._reload_wanted = False
        self._running = False  # every worker has started

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for k, pid in enumerate(self._pids):
            fd = os.pidfd_open(pid)
            loop.add_reader(fd, self._reap, k, fd)
        for sig, handler in ((signal.SIGTERM, self._stop.set), (signal.SIGINT, self._stop.set),
                             (signal.SIGHUP, self._reload)):
            loop.add_signal_handler(sig, handler)
        server: MetricsServer | None = None
        code = 0
        try:
            if not await self._started():
                return 0 if self._stop.is_set() else 1  # a stop while starting is a stop
            s = self._settings
            if s.metrics.enabled:
                server = MetricsServer(self._exposition, self._ready)
                port = await server.start(s.metrics.bind, s.metrics.port)
                log.info("%d workers ready; metrics on http://%s:%d/metrics",
                         len(self._pids), s.metrics.bind, port)
            await self._refresh_status()
            self._notifier.send("READY=1\n" + self._status)
            self._notifier.start()
            self._running = True
            if self._reload_wanted:  # a SIGHUP while the workers started
                self._reload()
            refresher = asyncio.create_task(self._keep_status_fresh())
            await first_of(self._stop.wait(), self._exited.wait())
            refresher.cancel()
            if not self._stop.is_set():
                code = 1
                log.error("worker %s exited unexpectedly; stopping the others (systemd "
                          "restarts the service; the spools keep what was acknowledged)",
                          ", ".join(f"{k} (code {c})" for k, c in self._exit_codes.items()))
        finally:
            self._running = False
            if self._reloading is not None:
                self._reloading.cancel()
            self._notifier.send("STOPPING=1\n" + self._status_line("stopping"))
            code = max(code, await self._stop_workers())
            if server is not None:
                await server.close()
            for line in self._lines:
                line.close()
            await self._notifier.stop()
        return code

    async def _started(self) -> bool:
        """Wait until every worker answers (it has started); False if one exits first."""
        starting = asyncio.ensure_future(
            asyncio.gather(*(line.ready(START_TIMEOUT_S) for line in self._lines)))
        await first_of(starting, self._exited.wait(), self._stop.wait())
        if starting.done() and not starting.cancelled() and starting.exception() is None:
            return True
        starting.cancel()  # a worker exited or we stop: stop waiting for the others
        if not self._stop.is_set():
            why = "a worker exited" if self._exited.is_set() else str(starting.exception())
            log.error("workers did not all start: %s", why)
        return False

    # -- workers ---------------------------------------------------------------------------
    def _reap(self, index: int, fd: int) -> None:
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        _, status = os.waitpid(self._pids[index], 0)
        self._exit_codes[index] = code = os.waitstatus_to_exitcode(status)
        level = logging.INFO if self._stopping and code == 0 else logging.WARNING
        log.log(level, "worker %d (pid %d) exited with %s", index, self._pids[index],
                f"code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}")
        self._exited.set()

    def _signal_workers(self, sig: signal.Signals) -> None:
        for k, pid in enumerate(self._pids):
            if k not in self._exit_codes:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    async def _stop_workers(self) -> int:
        """SIGTERM every worker (each drains its spool), then wait; 1 if any failed."""
        self._stopping = True
        self._signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + self._settings.gateway.shutdown_grace_s + KILL_AFTER_S
        while len(self._exit_codes) < len(self._pids):
            self._exited.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("workers still running after %.0fs: killing them",
                          self._settings.gateway.shutdown_grace_s + KILL_AFTER_S)
                self._signal_workers(signal.SIGKILL)
                deadline = time.monotonic() + KILL_AFTER_S
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exited.wait(), left)
        return 0 if all(c == 0 for c in self._exit_codes.values()) else 1

    def _workers_answer(self) -> bool:
        """Every worker answered within the watchdog's interval (the status refresh asks
        each every STATUS_REFRESH_S); a stuck one must not be hidden by our own pings."""
        limit = max(2 * STATUS_REFRESH_S, self._notifier.watchdog_interval_s or 0.0)
        now = time.monotonic()
        return all(now - line.answered_at < limit for line in self._lines)

    def _reload(self) -> None:
        """SIGHUP. One arriving while the workers start or reload is not lost: it runs
        once they are done."""
        self._reload_wanted = True
        if self._running and (self._reloading is None or self._reloading.done()):
            self._reloading = asyncio.create_task(self._reload_workers())

    async def _reload_workers(self) -> None:
        """Each worker reloads (over its control line, not a signal), then READY=1."""
        while self._reload_wanted and not self._stop.is_set():
            self._reload_wanted = False
            self._notifier.send(reloading_message())
            answers = await asyncio.gather(*(line.reload(RELOAD_TIMEOUT_S)
                                             for line in self._lines), return_exceptions=True)
            for line, answer in zip(self._lines, answers, strict=True):
                if isinstance(answer, BaseException) or not answer[0]:
                    log.error("worker %d did not reload: %s", line.index,
                              answer if isinstance(answer, BaseException) else answer[1])
            self._notifier.send("READY=1")

    # -- what systemd and Prometheus see ---------------------------------------------------
    async def _exposition(self) -> bytes:
        """The workers' metrics merged. A worker that does not answer is counted down but
        represented by its last answer, so the summed counters never go backwards."""
        answers = await asyncio.gather(*(line.ask(b"metrics", ASK_TIMEOUT_S)
                                         for line in self._lines), return_exceptions=True)
        up = 0
        for line, answer in zip(self._lines, answers, strict=True):
            if isinstance(answer, bytes):
                self._last_metrics[line.index] = answer
                up += 1
            else:
                log.warning("no metrics from worker %d: %s", line.index, answer)
        return merge(list(self._last_metrics.values()), len(self._lines), up)

    async def _ready(self) -> tuple[bool, str]:
        answers = await asyncio.gather(*(line.ready(ASK_TIMEOUT_S) for line in self._lines),
                                       return_exceptions=True)
        reasons = []
        for line, answer in zip(self._lines, answers, strict=True):
            if isinstance(answer, BaseException):
                return False, f"worker {line.index}: {answer}"
            ok, why = answer
            if not ok:
                return False, f"worker {line.index}: {why}"
            reasons.append(why.removeprefix("ready: "))
        if len(set(reasons)) == 1:
            return True, f"ready: {len(self._lines)} workers, {reasons[0]}"
        return True, f"ready: {len(self._lines)} workers: " + "; ".join(
            f"worker {k}: {why}" for k, why in enumerate(reasons))

    async def _keep_status_fresh(self) -> None:
        while True:
            await asyncio.sleep(STATUS_REFRESH_S)
            await self._refresh_status()

    async def _refresh_status(self) -> None:
        try:
            merged = await self._exposition()
        except Exception:  # the status line must never take the supervisor down
            log.exception("cannot build the systemd STATUS line")
            return
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(merged.decode()):
            for sample in family.samples:
                if not sample.labels:
                    values[sample.name] = sample.value
        self._figures = values
        self._status = self._status_line("running")

    def _status_line(self, state: str) -> str:
        """The single process's STATUS line from the merged figures, plus the workers."""
        values, ns = self._figures, "nbiot_gateway_"
        return status_line(
            state=state,
            uplinks_per_s=self._uplink_rate.per_s(values.get(f"{ns}uplinks_received_total", 0)),
            broker_connected=values.get(f"{ns}mqtt_connected", 0) == 1,
            spool_records=int(values.get(f"{ns}spool_records", 0)),
            spool_bytes=int(values.get(f"{ns}spool_bytes", 0)),
            spool_max_bytes=int(values.get(f"{ns}spool_max_bytes", 0)),
        ) + f", {int(values.get(f'{ns}workers_up', 0))} of {len(self._lines)} workers answering"

