"""Waiting on the first of several things (an event, a closed connection, a stop request)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


async def first_of(*aws: Awaitable[object]) -> None:
    """Wait until the first of these awaitables completes; cancel the coroutines' rest.
    Futures and tasks passed in are left alone: they belong to the caller."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for aw, task in zip(aws, tasks, strict=True):
            if task is not aw:
                task.cancel()
