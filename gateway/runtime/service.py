"""Wiring and lifecycle of the daemon: start the stages, run, reload, drain, stop.

Read top to bottom: `startup()`, `main_loop()`, `shutdown()`. Signal handlers only set
flags; the loop acts on them. A drained stop exits 0; what is not published stays spooled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cluster.membership import rank
from gateway.config import Settings, load_config
from gateway.errors import ConfigError
from gateway.ingest.coap import wire
from gateway.ingest.coap.server import Address, CoapServer, UplinkSink, bind_udp
from gateway.ingest.coap.udp import gather_s, serve_udp
from gateway.mqtt.publisher import Publisher
from gateway.pipeline.core import Pipeline
from gateway.pipeline.registry import Registry, load_registry
from gateway.runtime import allocator, gctune
from gateway.runtime.metrics import NS, Metrics, MetricsServer
from gateway.runtime.notify import Notifier, UplinkRate, reloading_message, status_line
from gateway.runtime.workers import WorkerLinks, state_files, worker_share
from gateway.store.downlink import MAX_COMMAND_BYTES, TOO_LARGE, Downlink, DownlinkStore
from gateway.store.liveness import Liveness, LivenessStore
from gateway.store.spool import Spool

if TYPE_CHECKING:
    from gateway.cluster.handover import Holdings, Span
    from gateway.cluster.peers import PeerChannel
    from gateway.ingest.coap.dtls import DtlsServer
    from gateway.ingest.lwm2m.server import Lwm2mServer
    from gateway.runtime.siblings import Siblings
    from gateway.store.registrations import Registrations

log = logging.getLogger(__name__)
COMMIT_WAIT_S = 5.0
STOP_AND_RELOAD = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
RELOADABLE = ("registry", "types", "sim")  # config sections SIGHUP applies (sim: not ours)


class Service:
    def __init__(self, settings: Settings, config_path: Path | None = None,
                 links: WorkerLinks | None = None) -> None:
        """`links`: set when this is one of several workers under the supervisor."""
        self._links = links
        self._worker, self._workers = (links.index, links.workers) if links else (0, 1)
        self.settings = worker_share(settings, self._workers)
        self.config_path = config_path
        self._siblings: Siblings | None = None
        self._peers: PeerChannel | None = None
        self._holdings: Holdings | None = None
        self._control_task: asyncio.Task[None] | None = None
        self.metrics = Metrics()
        self.stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._spool: Spool | None = None
        self._pipeline: Pipeline | None = None
        self._coap: CoapServer | None = None
        self._dtls: DtlsServer | None = None
        self._metrics_server: MetricsServer | None = None
        self._publisher: Publisher | None = None
        self._publisher_task: asyncio.Task[None] | None = None
        self._publisher_stop = asyncio.Event()
        # systemd: READY/RELOADING/STOPPING, STATUS and the watchdog ping from this loop.
        self._notifier = Notifier(self._status_line)
        self._uplink_rate = UplinkRate()
        self._liveness: Liveness | None = None
        self._downlink: Downlink | None = None
        self._lwm2m: Lwm2mServer | None = None
        self._registrations: Registrations | None = None
        self._background: list[asyncio.Task[None]] = []

    async def run(self) -> int:
        try:
            # Inside the try: a start that fails half-way (a port in use) must still stop the
            # spool's writer thread, or the process prints its error and never exits.
            await self.startup()
            await self.main_loop()
        finally:
            await self.shutdown()
        return 0

    # -- startup ---------------------------------------------------------------------
    async def startup(self) -> None:
        s = self.settings
        started = time.monotonic()
        gctune.tune()
        if not allocator.fix_mmap_threshold():
            log.info("malloc's mmap threshold left as it is (set by the operator, or not glibc)")
        every_device, registry = self._load_registry(s)
        assert s.liveness.path is not None  # load_config derives it from the spool path
        files = state_files(s.spool.path, s.liveness.path, self._worker, self._workers)
        self._spool = spool = Spool(files.spool, s.spool.max_bytes, s.spool.max_batch,
                                   s.spool.commit_linger_ms / 1000)
        spool.open()
        spool.on_commit = self._on_commit
        m = self.metrics
        m.spool_records.set_function(lambda: spool.records)
        m.spool_bytes.set_function(lambda: spool.size_bytes)
        m.spool_max_bytes.set(s.spool.max_bytes)
        m.workers.set(self._workers)
        m.workers_up.set(self._workers)
        topic_base = f"{s.mqtt.topic_prefix}/{s.gateway.tenant}"
        self._liveness = Liveness(registry, spool, m, topic_base, s.liveness.offline_after_intervals,
                                  LivenessStore(files.liveness))
        await self._liveness.load()
        self._downlink = Downlink(registry, DownlinkStore(files.downlink), spool, topic_base)
        await self._downlink.load()
        self._pipeline = Pipeline(s, registry, spool, m, self._liveness, self._downlink,
                                  every_device)
        loop = asyncio.get_running_loop()
        listening = []
        if self._links is not None:
            from gateway.runtime.siblings import Siblings

            self._siblings = Siblings(self._worker, self._links.inbox, self._links.outboxes, m)
        if s.cluster.enabled:
            self._peers = self._cluster_channel()
        if s.coap.enabled:
            router = self._router()
            self._coap = coap = CoapServer(
                self._pipeline, m, max_payload_bytes=s.coap.max_payload_bytes,
                dedup_max_entries=s.coap.dedup_max_entries, router=router)
            if self._links is not None:
                assert self._links.udp is not None  # bound when coap.enabled
                sock = self._links.udp  # bound by the supervisor, SO_REUSEPORT
            else:
                sock = bind_udp(s.coap.bind, s.coap.port)
            # A datagram another process or host would answer gets no wait here: the
            # owner's linger could not count it.
            serve_udp(sock, coap, 0.0 if router else gather_s(s.spool.commit_linger_ms / 1000),
                      spool.together)
            listening.append(f"coap udp {s.coap.bind} port {sock.getsockname()[1]}")
            if s.lwm2m.enabled:  # on the CoAP socket (config: one worker, no cluster)
                listening.append(await self._start_lwm2m(coap, registry, files.spool.parent))
        if s.coaps.enabled and self._worker == 0:  # DTLS sessions live in worker 0
            listening.append(await self._start_dtls(every_device))
            if self._lwm2m is not None and self._dtls is not None:
                self._lwm2m.attach_dtls(self._dtls)
        if self._siblings is not None:
            self._siblings.start(self._coap.datagram_received if self._coap else _drop,
                                 self._downlink.receive, self._pipeline,
                                 self._downlink.settled_elsewhere)
        if self._peers is not None and self._coap is not None:
            listening.append(await self._peers.start(self._coap.datagram_received,
                                                     self._coap.send_to_device,
                                                     self._handed_over))
        metrics_where = "disabled"
        if self._links is not None:
            metrics_where = "served by the supervisor"
        elif s.metrics.enabled:
            self._metrics_server = MetricsServer(self._exposition, self._ready_async)
            port = await self._metrics_server.start(s.metrics.bind, s.metrics.port)
            metrics_where = f"http://{s.metrics.bind}:{port}/metrics"
        # One subscription for downlink commands, in worker 0 (the session of a single
        # process, so changing gateway.workers keeps it); it hands other workers theirs.
        self._publisher = publisher = Publisher(s.mqtt, s.gateway.id, spool, m, s.gateway.tenant,
                                    on_command=self._on_command if self._worker == 0 else None,
                                    worker=self._worker if self._links else None,
                                    on_command_state=self._on_command_state
                                    if self._peers is not None and self._worker == 0 else None)
        self._pipeline.broker_connected = lambda: publisher.connected
        self._publisher_task = asyncio.create_task(
            self._publisher.run(self._publisher_stop), name="publisher")
        self._background = [
            asyncio.create_task(self._housekeeping(s.liveness.check_interval_s,
                                                   s.liveness.save_interval_s),
                                name="housekeeping"),
            asyncio.create_task(self._loop_lag_monitor(), name="loop-lag"),
        ]
        for sig, handler in ((signal.SIGTERM, self.stop.set), (signal.SIGINT, self.stop.set),
                             (signal.SIGHUP, self._reload.set)):
            loop.add_signal_handler(sig, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_AND_RELOAD)  # a worker blocks them
        log.info("gateway %s ready: %s, %d devices, %d types, spool %s "
                 "(%d records waiting), broker %s, metrics %s, started in %.2fs",
                 s.gateway.id, ", ".join(listening), len(registry), len(s.types), files.spool,
                 spool.records, ", ".join(f"{h}:{p}" for h, p in s.mqtt.broker_addresses()),
                 metrics_where,
                 time.monotonic() - started)
        gctune.settle()  # what startup built stays out of every later collection
        if self._links is not None:
            from gateway.runtime import control

            self._control_task = asyncio.create_task(control.serve(
                self._links.control, self._ready, self.metrics.exposition, self.reload,
                self.stop.set), name="control")
            return  # the supervisor speaks to systemd
        self._notifier.send("READY=1\n" + self._status_line())
        self._notifier.start()

    async def _start_lwm2m(self, coap: CoapServer, registry: Registry, state_dir: Path) -> str:
        from gateway.ingest.lwm2m import commands
        from gateway.ingest.lwm2m.server import Lwm2mServer
        from gateway.store.registrations import Registrations, RegistrationStore

        assert self._pipeline is not None and self._downlink is not None
        assert self._liveness is not None
        self._registrations = Registrations(RegistrationStore(state_dir / "lwm2m.sqlite"))
        await self._registrations.load()
        self._lwm2m = Lwm2mServer(self.settings, registry, self._pipeline, self._registrations,
                                  self._downlink, self._liveness, self.metrics)
        self._lwm2m.attach(coap)
        self._downlink.check = commands.check
        return (f"lwm2m on the coap port ({len(self._registrations)} registrations, NoSec "
                f"{'allowed' if self.settings.lwm2m.allow_nosec else 'refused'})")

    def _cluster_channel(self) -> PeerChannel:
        """The peer channel and this host's view of its peers; liveness, the ownership
        gauges and the handover of devices this host gives up follow every change of who
        is alive."""
        from gateway.cluster.handover import Holdings
        from gateway.cluster.membership import Membership
        from gateway.cluster.peers import PeerChannel

        cluster = self.settings.cluster
        assert cluster.host is not None and self._liveness is not None  # config checked
        assert self._pipeline is not None
        membership = Membership(cluster.host, cluster.hosts, cluster.peer_dead_after_s)
        peers = PeerChannel(cluster, self._worker, self._workers, self.metrics, membership)
        liveness = self._liveness
        self._holdings = holdings = Holdings()
        self._pipeline.note_accepts(holdings.note)

        def changed(before: tuple[str, ...], alive: tuple[str, ...]) -> None:
            liveness.owners_changed(membership.owns, time.time())
            self._count_owned(peers)
            self._hand_over(peers, holdings.give_up(membership.owns))

        membership.on_change.append(changed)
        changed((), membership.alive)
        return peers

    def _count_owned(self, peers: PeerChannel) -> None:
        """The ownership gauges, from the devices liveness says this host owns; the devices
        this host holds for another (whose accepts it notes) with them."""
        assert self._liveness is not None and self._liveness.owned is not None
        assert self._holdings is not None
        self._holdings.held = peers.taken_over(self._liveness.owned)
        self.metrics.cluster_devices_owned.set(len(self._liveness.owned))
        self.metrics.cluster_devices_taken_over.set(len(self._holdings.held))

    def _hand_over(self, peers: PeerChannel, given_up: dict[str, Span]) -> None:
        """Send each device's new owner the seqs this host accepted while it held it."""
        by_host: dict[str, dict[str, Span]] = {}
        for device_id, span in given_up.items():
            by_host.setdefault(peers.membership.owner(device_id), {})[device_id] = span
        for host, spans in by_host.items():
            messages = peers.hand_over(host, spans)
            log.info("cluster: %d devices go back to %s, with the seqs accepted for them "
                     "here (%d messages)", len(spans), host, messages)

    def _handed_over(self, sender: str, spans: dict[str, Span]) -> None:
        """A peer gave this host devices, with the seqs it accepted for them."""
        from gateway.cluster.handover import seqs_of

        assert self._pipeline is not None and self._peers is not None
        for device_id, span in spans.items():
            self._pipeline.merge_accepts(device_id, seqs_of(span), sender, self._peers.me)

    def _router(self) -> Callable[[wire.Message, bytes, Address], bool] | None:
        """Where an uplink datagram goes before this process handles it: to the host owning
        its device (cluster), else to the worker owning it (workers)."""
        peers, siblings = self._peers, self._siblings
        if peers is None:
            return siblings.route if siblings is not None else None
        if siblings is None:
            return peers.route
        return lambda msg, data, addr: (peers.route(msg, data, addr)
                                        or siblings.route(msg, data, addr))

    async def _start_dtls(self, registry: Registry) -> str:
        from gateway.ingest.coap.dtls import DtlsServer  # aiocoap's server side: only when enabled

        s = self.settings
        assert self._pipeline is not None and s.coaps.bind is not None  # config checked both
        sink: UplinkSink = self._pipeline
        if self._siblings is not None:
            from gateway.runtime.siblings import OwnersSink

            sink = OwnersSink(self._pipeline, self._siblings)
        self._dtls = DtlsServer(sink, self.metrics, registry,
                                max_payload_bytes=s.coap.max_payload_bytes,
                                max_sessions=s.coaps.max_sessions,
                                session_idle_s=s.coaps.session_idle_s)
        await self._dtls.start(s.coaps.bind, s.coaps.port)
        self._warn_no_psk()
        return (f"coaps (DTLS) udp {s.coaps.bind} port {s.coaps.port} "
                f"({self._dtls.devices_with_psk} devices with a psk)")

    def _warn_no_psk(self) -> None:
        if self._dtls is not None and self._dtls.devices_with_psk == 0:
            log.warning("coaps is enabled but no device in the registry has a psk: "
                        "no device can use it")

    async def _housekeeping(self, interval_s: float, save_interval_s: float) -> None:
        """Every interval: mark silent devices offline, expire downlink commands, save the
        downlink queue; every save interval also the last-seen table (each save rewrites
        most of its pages: at 667 uplinks/s every 10 s was ~500 bytes per uplink)."""
        assert self._liveness is not None and self._downlink is not None
        loop = asyncio.get_running_loop()
        next_save = loop.time() + save_interval_s
        while True:
            await asyncio.sleep(interval_s)
            try:
                now = time.time()
                self._liveness.sweep(now)
                self._downlink.sweep(now)
                if self._lwm2m is not None:
                    self._lwm2m.sweep(now)
                if loop.time() >= next_save:
                    next_save = loop.time() + save_interval_s
                    await self._liveness.save()
                await self._downlink.save()
            except Exception:  # task boundary: keep sweeping, say why it failed
                log.exception("housekeeping (liveness, downlink expiry) failed")

    async def _loop_lag_monitor(self, period_s: float = 0.1) -> None:
        """Measure how late the loop runs a timer; past `limits.max_loop_lag_s`, shed load."""
        loop = asyncio.get_running_loop()
        limit_s = self.settings.limits.max_loop_lag_s
        while True:
            due = loop.time() + period_s
            await asyncio.sleep(period_s)
            lag_s = max(0.0, loop.time() - due)
            self.metrics.event_loop_lag_seconds.set(lag_s)
            overloaded = lag_s > limit_s
            if self._pipeline is not None and overloaded != self._pipeline.overloaded:
                self._pipeline.overloaded = overloaded
                if overloaded:
                    log.warning("event loop %.2fs late: answering 5.03 to new uplinks", lag_s)
                else:
                    log.info("event loop on time again: accepting uplinks")

    def _status_line(self) -> str:
        received = self.metrics.registry.get_sample_value(f"{NS}_uplinks_received_total") or 0.0
        spool = self._spool
        return status_line(
            state="stopping" if self.stop.is_set() else "running",
            uplinks_per_s=self._uplink_rate.per_s(received),
            broker_connected=self._publisher is not None and self._publisher.connected,
            spool_records=spool.records if spool is not None else 0,
            spool_bytes=spool.size_bytes if spool is not None else 0,
            spool_max_bytes=self.settings.spool.max_bytes)

    def _on_commit(self, records: int, seconds: float) -> None:
        self.metrics.spool_commit_seconds.observe(seconds)
        self.metrics.spool_commit_records.inc(records)

    def _load_registry(self, s: Settings) -> tuple[Registry, Registry]:
        """Every device (coaps keys), and the devices this worker owns (all with one)."""
        every_device = load_registry(s.registry.path, s.types)
        return every_device, every_device.owned_by(self._worker, self._workers)

    async def _on_command(self, device_type: str, device_id: str, payload: bytes) -> None:
        """Worker 0's MQTT subscription: store the command in the worker owning its
        device; in a cluster only on the device's two keeper hosts."""
        assert self._downlink is not None
        announce = True
        if self._peers is not None:
            # Every host hears every command: the device's home host and the one that
            # serves it when home is down keep it (it survives the loss of either); the
            # one a device talks to delivers it, and the others drop theirs on its
            # `confirmed` (settled_elsewhere). Only the home host says `queued`.
            keepers = rank(device_id, self._peers.membership.hosts)[:2]
            if self._peers.me not in keepers:
                return
            announce = keepers[0] == self._peers.me
        if self._siblings is None or self._siblings.owns(device_id):
            await self._downlink.receive(device_type, device_id, payload, announce=announce)
            if self._lwm2m is not None:
                self._lwm2m.command_arrived(device_id)
        elif len(payload) > MAX_COMMAND_BYTES:  # the owner would refuse it: no need to send
            if announce:
                self._downlink.reject(device_type, device_id, payload, TOO_LARGE)
        else:
            await self._siblings.forward_command(device_type, device_id, payload, announce)

    async def _on_command_state(self, device_id: str, state_message: bytes) -> None:
        """Worker 0, in a cluster: a command state some host published on `.../down/ack`,
        for the worker keeping this device's copy (which drops it on `confirmed`)."""
        assert self._downlink is not None
        if self._siblings is None or self._siblings.owns(device_id):
            self._downlink.settled_elsewhere(device_id, state_message)
        else:
            await self._siblings.forward_state(device_id, state_message)

    async def _exposition(self) -> bytes:
        return self.metrics.exposition()

    async def _ready_async(self) -> tuple[bool, str]:
        return self._ready()

    def _ready(self) -> tuple[bool, str]:
        ingest = self._coap or self._dtls or self._siblings  # a worker may judge coaps only
        if ingest is None or self._spool is None or self.stop.is_set():
            return False, "not accepting uplinks"
        if not self._spool.has_room(1024):
            return False, "spool full: uplinks get 5.03"
        if self._spool.last_commit_failed:
            return False, "spool writes failing (disk full or I/O error, see the log): uplinks get 5.03"
        if self._publisher is not None and self._publisher.connected:
            return True, "ready: broker connected"
        return True, "ready: broker disconnected, spooling"

    # -- running ---------------------------------------------------------------------
    async def main_loop(self) -> None:
        stop_wait = asyncio.ensure_future(self.stop.wait())
        try:
            while not self.stop.is_set():
                reload_wait = asyncio.ensure_future(self._reload.wait())
                assert self._publisher_task is not None and self._spool is not None
                writer_failed = self._spool.writer_failed
                assert writer_failed is not None
                waits: set[asyncio.Future[Any]] = {stop_wait, reload_wait, self._publisher_task,
                                                   writer_failed}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                reload_wait.cancel()
                if writer_failed.done():
                    # Nothing can be made durable: exit (systemd restarts the unit) rather
                    # than look healthy while every uplink waits for an answer.
                    raise RuntimeError(writer_failed.result())
                if self._publisher_task.done():
                    # The publisher only ends on its own through a bug: make it loud.
                    self._publisher_task.result()
                    raise RuntimeError("publisher stopped unexpectedly")
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload()
        finally:
            stop_wait.cancel()

    def reload(self) -> tuple[bool, str]:
        """SIGHUP: re-read config types and registry; keep the old ones if anything is wrong.
        Every other setting stays as started (ports, broker, topics, tenant, spool, limits):
        changing those is a restart, and the log says which changed. Returns whether it
        took, and what it did (a worker's answer to the supervisor)."""
        assert self._pipeline is not None
        self._notifier.send(reloading_message())
        try:
            settings = self._reloaded_settings()
            every_device, registry = self._load_registry(settings)
        except ConfigError as e:
            why = "; ".join(e.problems)
            log.error("reload failed, keeping the current registry: %s", why)
            self._notifier.send("READY=1")
            return False, why
        else:
            self.settings = settings
            self._pipeline.replace_registry(registry, settings, every_device)
            if self._liveness is not None:
                self._liveness.replace_registry(registry)
                if self._peers is not None:
                    self._count_owned(self._peers)
            if self._downlink is not None:
                self._downlink.replace_registry(registry)
            if self._lwm2m is not None:
                self._lwm2m.replace_registry(registry, settings)
            if self._dtls is not None:
                self._dtls.replace_keys(every_device)
                self._warn_no_psk()
            done = f"reloaded registry {settings.registry.path}: {len(registry)} devices"
            log.info("%s", done)
            gctune.settle()
        self._notifier.send("READY=1")
        return True, done

    def _reloaded_settings(self) -> Settings:
        if self.config_path is None:
            return self.settings
        new = worker_share(load_config(self.config_path), self._workers)
        waiting = [name for name in type(new).model_fields
                   if name not in RELOADABLE and getattr(new, name) != getattr(self.settings, name)]
        if waiting:
            log.warning("reload: changed [%s] in %s take effect at the next restart; only "
                        "the registry and the device types are reloaded", ", ".join(waiting),
                        self.config_path)
        return self.settings.model_copy(update={name: getattr(new, name) for name in RELOADABLE})

    # -- shutdown --------------------------------------------------------------------
    async def shutdown(self) -> None:
        if self._spool is None:
            return  # the start failed before anything was running
        self._notifier.send("STOPPING=1\n" + self._status_line())
        log.info("stopping: answering 5.03 to new uplinks, committing those in flight")
        if self._pipeline is not None:
            self._pipeline.accepting = False
        try:
            await self._stop_stages()
        finally:
            # Whatever failed above, the spool's writer thread must stop, or the process
            # never exits; what it holds stays for the next start.
            left = self._spool.records
            await self._spool.close()
            log.info("stopped; %d records remain spooled for the next start", left)
            if self._metrics_server is not None:
                await self._metrics_server.close()
            await self._notifier.stop()  # pings until here: a drain that hangs is noticed too

    async def _stop_stages(self) -> None:
        assert self._spool is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._spool.wait_committed(), COMMIT_WAIT_S)
        if self._coap is not None:
            self._coap.close()
        if self._peers is not None:
            self._peers.close()
        if self._siblings is not None:
            self._siblings.close()
        if self._control_task is not None:
            self._control_task.cancel()
        if self._lwm2m is not None:
            await self._lwm2m.close()
        if self._dtls is not None:
            await self._dtls.close()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._liveness is not None:
            await self._liveness.save()
        if self._downlink is not None:
            await self._downlink.close()
        if self._registrations is not None:
            await self._registrations.close()
        self._publisher_stop.set()
        if self._publisher_task is not None:
            try:
                await asyncio.wait_for(self._publisher_task, self.settings.gateway.shutdown_grace_s)
            except TimeoutError:
                log.warning("broker drain did not finish in %.0fs; the rest stays spooled",
                            self.settings.gateway.shutdown_grace_s)
            except (Exception, asyncio.CancelledError):  # the publisher's own end, not ours
                log.exception("publisher failed during shutdown")


def _drop(data: bytes, addr: object) -> None:
    """Where forwarded datagrams go when plain CoAP is off (none are sent then)."""
