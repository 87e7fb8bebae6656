"""The supervisor's line to each worker (gateway.workers > 1): a stream socketpair made
before the fork, one request at a time.

Requests are one line (`ready`, `metrics`); an answer is its length in bytes on a line,
then the bytes. `ready` answers `1 reason` or `0 reason`; the first answer also tells the
supervisor the worker has started. `metrics` answers the worker's Prometheus exposition.
When the supervisor's end closes (it died, even by kill -9), the worker stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

READY, METRICS = b"ready", b"metrics"


class ControlError(Exception):
    """A worker did not answer its supervisor."""


# -- the worker's side ----------------------------------------------------------------------
async def serve(sock: socket.socket, ready: Callable[[], tuple[bool, str]],
                exposition: Callable[[], bytes], lost: Callable[[], None]) -> None:
    """Answer the supervisor until it hangs up; then call `lost`."""
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        while line := await reader.readline():
            request = line.strip()
            if request == READY:
                ok, why = ready()
                body = f"{int(ok)} {why}".encode()
            elif request == METRICS:
                body = exposition()
            else:
                body = b""
            writer.write(b"%d\n" % len(body) + body)
            await writer.drain()
    except (ConnectionError, OSError) as e:
        log.warning("supervisor connection failed: %s", e)
    finally:
        writer.close()
    lost()


# -- the supervisor's side --------------------------------------------------------------------
class WorkerLine:
    """The supervisor's end of one worker's control socket."""

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self._sock = sock
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    async def ask(self, request: bytes, timeout_s: float) -> bytes:
        async with self._lock:
            try:
                async with asyncio.timeout(timeout_s):
                    if self._streams is None:
                        self._streams = await asyncio.open_connection(sock=self._sock)
                    reader, writer = self._streams
                    writer.write(request + b"\n")
                    await writer.drain()
                    length = int(await reader.readline() or b"-1")
                    if length < 0:
                        raise ControlError(f"worker {self.index} closed its control line")
                    return await reader.readexactly(length)
            except (TimeoutError, ConnectionError, OSError, ValueError,
                    asyncio.IncompleteReadError) as e:
                self.close()  # a half-read answer would shift every later one
                raise ControlError(f"worker {self.index} did not answer {request.decode()!r}: "
                                   f"{e or type(e).__name__}") from None

    async def ready(self, timeout_s: float) -> tuple[bool, str]:
        answer = (await self.ask(READY, timeout_s)).decode(errors="replace")
        flag, _, why = answer.partition(" ")
        return flag == "1", why

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None
        else:
            with contextlib.suppress(OSError):
                self._sock.close()
