"""`nbiot-gateway sim`: load config and registry, apply the command line over `[sim]`, run,
print the summary (and write JSON), and turn the result into an exit code.

Exit 0: nothing acked was lost; 1: something acked was lost, the gateway never answered,
or a part of the simulator (the witness, a fleet process) failed; 2: bad configuration or
arguments.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.config import SimSection, load_config
from gateway.errors import ConfigError
from gateway.pipeline.registry import load_registry

EXIT_OK, EXIT_LOST, EXIT_CONFIG = 0, 1, 2
EXIT_INTERRUPTED = 130


def sim_section(base: SimSection, overrides: dict[str, Any]) -> SimSection:
    """`[sim]` with the command line's values on top, validated like the file's."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return SimSection.model_validate({**base.model_dump(), **given})
    except ValidationError as e:
        raise ConfigError([f"sim.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                           for err in e.errors()]) from None


def _print_problems(where: object, e: ConfigError) -> None:
    print(f"{where}: configuration is invalid:", file=sys.stderr)
    for problem in e.problems:
        print(f"  {problem}", file=sys.stderr)


def make_registry_command(config: Path, n: int, out: Path | None, interval_s: float | None) -> int:
    from gateway.tools.sim.registry_file import make_registry, type_counts

    if out is None:
        print("--make-registry needs --out FILE", file=sys.stderr)
        return EXIT_CONFIG
    try:
        settings = load_config(config)
    except ConfigError as e:
        _print_problems(config, e)
        return EXIT_CONFIG
    try:
        make_registry(out, n, settings.types, int(interval_s or 60))
    except FileExistsError:
        print(f"{out} exists already; not overwriting it", file=sys.stderr)
        return EXIT_CONFIG
    except (OSError, ValueError) as e:
        print(f"cannot write {out}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    mix = ", ".join(f"{c} {t}" for t, c in type_counts(n, settings.types).items())
    print(f"wrote {n} devices to {out} ({mix})")
    return EXIT_OK


def run_command(config: Path, overrides: dict[str, Any], json_path: Path | None,
                show_progress: bool = True) -> int:
    from gateway.tools.sim.processes import SimulatorError
    from gateway.tools.sim.progress import Progress
    from gateway.tools.sim.run import simulate

    try:
        settings = load_config(config)
        sim = sim_section(settings.sim, overrides)
        registry = load_registry(settings.registry.path, settings.types)
    except ConfigError as e:
        _print_problems(config, e)
        return EXIT_CONFIG
    progress = Progress() if show_progress else None
    try:
        summary = asyncio.run(simulate(settings, registry, sim, progress))
    except KeyboardInterrupt:
        print("\nsimulation interrupted: no summary", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as e:
        _print_problems(config, e)
        return EXIT_CONFIG
    except SimulatorError as e:
        print(f"simulation aborted: {e}", file=sys.stderr)
        return EXIT_LOST
    return finish(summary, json_path)


def finish(summary: Any, json_path: Path | None) -> int:
    """Print the summary table, write the JSON, and pick the exit code."""
    print(summary.table())
    if json_path is not None:
        json_path.write_text(summary.to_json() + "\n")
    if summary.lost > 0:
        return EXIT_LOST
    answered = summary.acked or summary.rejected_by_code or summary.service_unavailable or (
        summary.rate_limited)
    if summary.sent and not answered:
        return EXIT_LOST
    return EXIT_OK
