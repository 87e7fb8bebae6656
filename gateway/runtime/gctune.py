"""The garbage collector, tuned for a daemon with a large long-lived heap and a hot path.

CPython's cyclic collector runs every 700 new container objects and, every so often,
walks every live object. At saturation an uplink makes a few dozen short-lived containers
while the registry, schemas and modules (hundreds of thousands of objects with 100,000
devices) never change: the default cadence spent ~30 of the ~72 µs an uplink cost on the
event loop (docs/decisions.md). Freezing what startup built takes it out of every later
collection, and a larger young generation makes collections rarer without letting
garbage pile up: almost nothing on the hot path makes reference cycles.
"""

from __future__ import annotations

import gc
import time

YOUNG_GENERATION_THRESHOLD = 10_000  # CPython's default: 700


def tune() -> None:
    """Collect less often than CPython's default."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, older, oldest)


def settle() -> float:
    """After startup or a reload: collect what the old objects left (a replaced registry's
    schema classes hold cycles), then freeze the survivors so collections skip them.
    Returns the pause in seconds."""
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - started
