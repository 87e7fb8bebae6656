"""Command line: argument parsing only; each command calls into service, demo or checks."""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
from pathlib import Path

from gateway import __version__
from gateway.errors import ConfigError

EXIT_CONFIG = 2


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, default=Path("config/gateway.toml"),
                   help="TOML config file (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbiot-gateway",
        description="CoAP uplinks from NB-IoT devices -> validated, durable spool -> MQTT.")
    parser.add_argument("--version", action="version", version=f"nbiot-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway daemon in the foreground")
    _config_arg(run)
    check = sub.add_parser("check-config", help="validate config and device registry, then exit")
    _config_arg(check)
    _sim_args(sub.add_parser(
        "sim", help="simulate a fleet of NB-IoT devices against a running gateway",
        description="Send real CoAP from many simulated devices (registry of --config) and "
                    "prove delivery on MQTT. Exit 1 if anything acked was lost."))
    _demo_args(sub.add_parser(
        "demo", help="start mosquitto and the gateway, simulate a fleet, summarize, stop",
        description="The main job in one command: a temporary broker and gateway on loopback, "
                    "a simulated fleet with a live display, a summary, a clean stop."))
    bench = sub.add_parser(
        "bench", help="measure the gateway against aiocoap and libcoap, side by side",
        description="One load generator (raw CoAP CON POSTs from N UDP endpoints, closed loop) "
                    "against: the gateway end to end, a bare aiocoap server, libcoap's "
                    "coap-server-notls, the gateway with its broker down. With --profile "
                    "fleet: the gateway alone at the plant's shape (many devices, a fresh UDP "
                    "socket per uplink, open loop at fixed rates), then saturated.")
    bench.add_argument("--profile", choices=["default", "fleet"], default="default",
                       help="default: the side-by-side comparison above; fleet: 40,000 sleeping "
                            "devices, a fresh UDP socket per uplink, open loop at --rates, then "
                            "saturation, with the gateway's CPU, disk bytes, fsyncs and ack "
                            "latency per rate (docs/benchmarks.md)")
    bench.add_argument("--devices", type=int,
                       help="devices (default: 2,000; fleet: 40,000)")
    bench.add_argument("--duration", type=float,
                       help="seconds per target (default: 10; fleet: 45 per rate)")
    bench.add_argument("--json", type=Path, dest="json_path", help="also write results as JSON")
    bench.add_argument("--workers", type=int, default=2,
                       help="also run the gateway with this many worker processes, for the "
                            "scaling from one (1: skip; default: %(default)s; not with fleet)")
    bench.add_argument("--rates", type=_rates, default=None,
                       help="fleet: uplinks/s of the paced runs, comma separated "
                            "(default: 667,4000)")
    bench.add_argument("--loadgen-procs", type=int, default=1,
                       help="fleet: load generator processes sharing the schedule "
                            "(default: %(default)s)")
    _soak_args(sub.add_parser(
        "soak", help="hours at the plant's shape, sampling the gateway's RSS, CPU, open files, "
                     "spool depth and disk writes, with a trend verdict for each",
        description="A broker, the gateway and an open-loop fleet (a fresh UDP socket per "
                    "uplink) for --duration; a line per sample, then the least-squares trend "
                    "of each figure after the warm-up. Exit 1 if anything acked was lost."))
    demo = sub.add_parser(
        "cluster-demo", help="(root) the cluster on one machine: namespaces, balancer, 3 "
                             "gateway hosts, 3 RabbitMQ nodes, a fleet, and faults",
        description="Builds devices, an nf_tables balancer, 3 gateway hosts and a 3-node "
                    "RabbitMQ cluster in network namespaces, runs the fleet through the "
                    "balancer, kills a gateway host and a broker node under load, and reads "
                    "the uplink queue back. Exit 0: nothing acknowledged lost; 1: lost; "
                    "2: it could not run.")
    demo.add_argument("--ack", choices=("disk", "broker"), default="broker",
                      help="cluster.ack of the gateway hosts (default: %(default)s)")
    demo.add_argument("--devices", type=int, default=3000)
    demo.add_argument("--interval", type=float, default=10.0, dest="interval_s",
                      help="report interval, s (default: %(default)s)")
    demo.add_argument("--duration", type=float, default=60.0, dest="duration_s",
                      help="the fleet's report window, s (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--prefix", default="nbg", help="namespace name prefix")
    demo.add_argument("--json", type=Path, dest="json_path", help="also write the report")
    demo.add_argument("--keep", action="store_true", help="keep the logs and state files")
    _balancer_args(sub.add_parser(
        "balancer", help="run the gateway cluster's UDP balancer (nf_tables) and its health "
                         "checker on this host (root)",
        description="Install an nf_tables table that spreads datagrams to --vip over the "
                    "--backend gateway hosts by a hash of the device's address and port "
                    "(stateless NAT: the hosts see the device's own address, replies leave "
                    "from the VIP), CoAP-ping every backend, move a dead one's devices to the "
                    "others, and remove the table on SIGTERM. See docs/operations.md."))
    return parser


def _balancer_args(p: argparse.ArgumentParser) -> None:
    from gateway.tools import balancer

    p.add_argument("--vip", required=True, help="the address devices send to (on this host)")
    p.add_argument("--port", type=int, default=balancer.COAP_PORT, dest="vip_port",
                   help="the VIP's UDP port (default: %(default)s)")
    p.add_argument("--backend", action="append", required=True, dest="backends",
                   metavar="NAME=IP[:PORT]",
                   help="a gateway host, once for each (port default: 5683)")
    p.add_argument("--interval", type=float, default=balancer.PROBE_INTERVAL_S,
                   dest="interval_s", help="seconds between CoAP pings (default: %(default)s)")
    p.add_argument("--down-after", type=int, default=balancer.DOWN_AFTER_MISSES,
                   help="missed pings in a row that take a backend out (default: %(default)s)")
    p.add_argument("--up-after", type=int, default=balancer.UP_AFTER_ANSWERS,
                   help="answered pings in a row that bring it back (default: %(default)s)")
    p.add_argument("--slots", type=int, default=balancer.SLOTS,
                   help="hash slots spread over the backends (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, help="serve /metrics and /readyz on this port")
    p.add_argument("--metrics-bind", default="127.0.0.1",
                   help="address of the metrics endpoint (default: %(default)s)")


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("rates must be positive")
    return rates


def _soak_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=7200.0, dest="duration_s",
                   help="seconds of load (default: %(default)g)")
    p.add_argument("--devices", type=int, default=40000,
                   help="devices, each reporting once per --interval (default: %(default)s)")
    p.add_argument("--interval", type=float, default=60.0, dest="interval_s",
                   help="each device's report interval, seconds (default: %(default)g)")
    p.add_argument("--sample-every", type=float, default=60.0, dest="sample_s",
                   help="seconds between samples (default: %(default)g)")
    p.add_argument("--warmup", type=float, default=600.0, dest="warmup_s",
                   help="seconds left out of the trends (default: %(default)g; at most a "
                        "third of the run)")
    p.add_argument("--loadgen-procs", type=int, default=1,
                   help="load generator processes sharing the schedule (default: %(default)s)")
    p.add_argument("--json", type=Path, dest="json_path", help="also write results as JSON")


def _sim_args(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("--devices", type=int, help="first N devices of the registry (default: all)")
    p.add_argument("--interval", type=float, dest="interval_s",
                   help="report interval in seconds (default: each device's from the registry)")
    p.add_argument("--duration", type=float, dest="duration_s", help="report window in seconds")
    p.add_argument("--profile", choices=["steady", "storm", "faulty"])
    p.add_argument("--seed", type=int, help="repeatable fleet, radio and faults")
    p.add_argument("--faulty-share", type=float, dest="faulty_share",
                   help="share of faulty devices (default: by profile)")
    p.add_argument("--host", help="the gateway's CoAP address (default: [sim] host)")
    p.add_argument("--port", type=int, help="the gateway's CoAP port (default: [coap] port)")
    p.add_argument("--json", type=Path, dest="json_path", help="also write the summary as JSON")
    p.add_argument("--processes", type=int, help="fleet processes, devices split by index (default: 1)")
    p.add_argument("--lwm2m-share", type=float, dest="lwm2m_share",
                   help="share of the fleet that speaks LwM2M (Register, Send) instead of /up "
                        "(default: [sim] lwm2m_share; the gateway needs [lwm2m] enabled, allow_nosec)")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")
    p.add_argument("--make-registry", type=int, metavar="N",
                   help="write a registry of N devices to --out and exit (no simulation)")
    p.add_argument("--out", type=Path, help="the registry file --make-registry writes")


def _demo_args(p: argparse.ArgumentParser) -> None:
    from gateway.tools.demo import (
        DEFAULT_DEVICES,
        DEFAULT_DURATION_S,
        DEFAULT_INTERVAL_S,
        DEFAULT_LWM2M_SHARE,
    )

    p.add_argument("--config", "-c", type=Path, default=None,
                   help="config to derive the demo's from (default: the shipped gateway.toml)")
    p.add_argument("--devices", type=int, default=DEFAULT_DEVICES,
                   help="devices to simulate (default: %(default)s)")
    p.add_argument("--duration", type=float, dest="duration_s", default=DEFAULT_DURATION_S,
                   help="report window in seconds (default: %(default)s)")
    p.add_argument("--interval", type=float, dest="interval_s", default=DEFAULT_INTERVAL_S,
                   help="report interval of every device in seconds (default: %(default)s)")
    p.add_argument("--profile", choices=["steady", "storm", "faulty"], default="steady")
    p.add_argument("--seed", type=int)
    p.add_argument("--json", type=Path, dest="json_path", help="also write the summary as JSON")
    p.add_argument("--processes", type=int, help="fleet processes, devices split by index (default: 1)")
    p.add_argument("--lwm2m-share", type=float, dest="lwm2m_share", default=DEFAULT_LWM2M_SHARE,
                   help="share of the fleet that speaks LwM2M (queue mode, Send) instead of /up; "
                        "the demo's gateway enables [lwm2m] for them (default: %(default)s)")


def _load(path: Path) -> tuple[object, object]:
    from gateway.config import load_config
    from gateway.pipeline.registry import load_registry

    settings = load_config(path)
    registry = load_registry(settings.registry.path, settings.types)
    return settings, registry


def _config_invalid(path: Path, error: ConfigError) -> int:
    print(f"{path}: configuration is invalid:", file=sys.stderr)
    for problem in error.problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_CONFIG


def cmd_check_config(path: Path) -> int:
    try:
        settings, registry = _load(path)
    except ConfigError as e:
        return _config_invalid(path, e)
    from gateway.config import Settings
    from gateway.pipeline.registry import Registry

    assert isinstance(settings, Settings) and isinstance(registry, Registry)
    ingest = []
    if settings.coap.enabled:
        ingest.append(f"coap {settings.coap.bind} port {settings.coap.port}"
                      + ("" if settings.coap.require_token else " (no token required)"))
    if settings.coaps.enabled:
        # A device without a psk is no error: it simply cannot use coaps.
        with_psk = sum(1 for device in registry if device.psk is not None)
        ingest.append(f"coaps {settings.coaps.bind} port {settings.coaps.port} "
                      f"({with_psk} of {len(registry)} devices have a psk, only they can use it)")
    if settings.lwm2m.enabled:
        mapped = [name for name, spec in settings.types.items() if spec.lwm2m is not None]
        ingest.append(f"lwm2m on the coap port (NoSec "
                      f"{'allowed' if settings.lwm2m.allow_nosec else 'refused'}; types "
                      f"mapping resources: {', '.join(mapped) or 'none'})")
    print(f"{path}: OK: {len(registry)} devices, {len(settings.types)} device types, "
          f"{', '.join(ingest)}, "
          f"broker {', '.join(f'{h}:{p}' for h, p in settings.mqtt.broker_addresses())}, "
          f"spool {settings.spool.path}")
    return 0


def cmd_run(path: Path) -> int:
    from gateway.config import load_config
    from gateway.runtime.logs import setup_logging
    from gateway.runtime.rebalance import RebalanceError, rebalance
    from gateway.runtime.service import Service
    from gateway.store.spool import SpoolError

    try:
        settings = load_config(path)
    except ConfigError as e:
        return _config_invalid(path, e)
    setup_logging(settings.gateway.log_level)
    workers = settings.gateway.workers
    try:
        _lock_state_directory(settings.spool.path.parent)
    except OSError as e:
        print(f"cannot start: {e}", file=sys.stderr)
        return 1
    try:
        assert settings.liveness.path is not None  # load_config derives it from the spool path
        moved = rebalance(settings.spool.path, settings.liveness.path, workers)
    except (RebalanceError, OSError, sqlite3.Error) as e:
        print(f"cannot start: the state files in {settings.spool.path.parent} do not fit "
              f"gateway.workers = {workers}: {e}", file=sys.stderr)
        return 1
    if moved:
        logging.getLogger("gateway").info("%s", moved)
    if settings.cluster.enabled and settings.cluster.check_uplink_queue:
        from gateway.cluster import uplink_queue

        try:
            logging.getLogger("gateway").info("%s", uplink_queue.check(settings))
        except uplink_queue.UplinkQueueMissing as e:
            print(f"cannot start in cluster mode: {e}", file=sys.stderr)
            return 1
    if workers > 1:
        from gateway.runtime import supervisor

        try:
            # The registry is read by each worker; read it here too, so a bad file is
            # reported once, with exit 2, before anything forks.
            from gateway.pipeline.registry import load_registry

            load_registry(settings.registry.path, settings.types)
            return supervisor.run(settings, path)
        except ConfigError as e:
            return _config_invalid(path, e)
        except OSError as e:
            print(f"cannot start: {e}", file=sys.stderr)
            return 1

    async def main() -> int:
        return await Service(settings, path).run()

    import uvloop  # +8 to 23 % uplinks/s over asyncio's loop, same runs (docs/decisions.md)

    try:
        return uvloop.run(main())
    except ConfigError as e:  # the registry, read by the service as it starts
        return _config_invalid(path, e)
    except (SpoolError, OSError) as e:
        print(f"cannot start: {e}", file=sys.stderr)
        return 1


def _lock_state_directory(directory: Path) -> None:
    """Hold an exclusive lock on `directory/gateway.lock` until the process (and its
    workers) exit: two gateways on one spool would each publish and delete its records."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "gateway.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise OSError(f"another gateway (pid {holder}) uses the state in {directory}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # kept open: the lock lives with the fd


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return cmd_check_config(args.config)
    if args.command == "run":
        return cmd_run(args.config)
    if args.command == "sim":
        return cmd_sim(args)
    if args.command == "demo":
        from gateway.tools.demo import run_demo

        return run_demo(args.config, devices=args.devices, duration_s=args.duration_s,
                        interval_s=args.interval_s, profile=args.profile, seed=args.seed,
                        json_path=args.json_path, processes=args.processes,
                        lwm2m_share=args.lwm2m_share)
    if args.command == "bench":
        return cmd_bench(args)
    if args.command == "soak":
        from gateway.tools.bench.soak import run_soak

        return run_soak(devices=args.devices, interval_s=args.interval_s,
                        duration_s=args.duration_s, sample_s=args.sample_s,
                        warmup_s=args.warmup_s, json_out=args.json_path,
                        loadgen_procs=args.loadgen_procs)
    if args.command == "balancer":
        return cmd_balancer(args)
    if args.command == "cluster-demo":
        from gateway.tools.lab.cluster_demo import run_cluster_demo

        return run_cluster_demo(ack=args.ack, devices=args.devices, interval_s=args.interval_s,
                                duration_s=args.duration_s, seed=args.seed,
                                prefix=args.prefix, json_path=args.json_path, keep=args.keep)
    raise AssertionError(args.command)


def cmd_balancer(args: argparse.Namespace) -> int:
    from gateway.tools.balancer import Balancer, BalancerError, parse_backend, run_balancer

    try:
        balancer = Balancer(args.vip, [parse_backend(b) for b in args.backends], args.vip_port,
                            args.slots, args.interval_s, args.down_after, args.up_after)
    except BalancerError as e:
        print(f"balancer: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return run_balancer(balancer, args.metrics_bind, args.metrics_port)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.profile == "fleet":
        from gateway.tools.bench import fleet

        return fleet.run_fleet_bench(
            devices=args.devices or fleet.DEFAULT_DEVICES,
            rates=args.rates or fleet.DEFAULT_RATES,
            duration_s=args.duration or fleet.DEFAULT_DURATION_S,
            json_out=args.json_path, loadgen_procs=args.loadgen_procs)
    from gateway.tools.bench.runner import run_bench

    return run_bench(args.devices or 2000, args.duration or 10.0, args.json_path, args.workers)


def cmd_sim(args: argparse.Namespace) -> int:
    from gateway.tools.sim import command

    if args.make_registry is not None:
        return command.make_registry_command(args.config, args.make_registry, args.out,
                                             args.interval_s)
    overrides = {k: getattr(args, k) for k in (
        "devices", "interval_s", "duration_s", "profile", "seed", "faulty_share", "host", "port",
        "processes", "lwm2m_share")}
    return command.run_command(args.config, overrides, args.json_path,
                               show_progress=not args.no_progress)
