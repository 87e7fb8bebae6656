"""Command line: argument parsing only; each command calls into service, demo or checks."""

from __future__ import annotations

import argparse
import asyncio
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
    return parser


def _load(path: Path) -> tuple[object, object]:
    from gateway.config import load_config
    from gateway.registry import load_registry

    settings = load_config(path)
    registry = load_registry(settings.registry.path, settings.types)
    return settings, registry


def cmd_check_config(path: Path) -> int:
    try:
        settings, registry = _load(path)
    except ConfigError as e:
        print(f"{path}: configuration is invalid:", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    from gateway.config import Settings
    from gateway.registry import Registry

    assert isinstance(settings, Settings) and isinstance(registry, Registry)
    print(f"{path}: OK: {len(registry)} devices, {len(settings.types)} device types, "
          f"coap {settings.coap.bind} port {settings.coap.port}, "
          f"broker {settings.mqtt.host}:{settings.mqtt.port}, spool {settings.spool.path}")
    return 0


def cmd_run(path: Path) -> int:
    from gateway.config import load_config
    from gateway.logs import setup_logging
    from gateway.service import Service
    from gateway.spool import SpoolError

    try:
        settings = load_config(path)
    except ConfigError as e:
        print(f"{path}: configuration is invalid:", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(settings.gateway.log_level)

    async def main() -> int:
        return await Service(settings, path).run()

    try:
        return asyncio.run(main())
    except ConfigError as e:
        print("configuration is invalid:\n  " + "\n  ".join(e.problems), file=sys.stderr)
        return EXIT_CONFIG
    except (SpoolError, OSError) as e:
        print(f"cannot start: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return cmd_check_config(args.config)
    if args.command == "run":
        return cmd_run(args.config)
    raise AssertionError(args.command)
