"""The supervisor's line to each worker (gateway.workers > 1): a stream socketpair made
before the fork.

A request is one line, `{id} {what}` (`ready`, `metrics`, `reload`); its answer is a
line `{id} {length}` and then that many bytes. `ready` answers `1 reason` or `0 reason`;
the first answer also tells the supervisor the worker has started. `metrics` answers the
worker's Prometheus exposition. `reload` re-reads the registry and answers `1 what` or
`0 why` once done, so the supervisor tells systemd READY only after every worker has.
The id lets the supervisor give up on a slow answer and throw it away when it comes,
without closing the line: closing it is how the supervisor says it is gone (it died,
even by kill -9), and the worker then stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

READY, METRICS, RELOAD = b"ready", b"metrics", b"reload"


class ControlError(Exception):
    """A worker did not answer its supervisor."""


# -- the worker's side ----------------------------------------------------------------------
async def serve(sock: socket.socket, ready: Callable[[], tuple[bool, str]],
                exposition: Callable[[], bytes], reload: Callable[[], tuple[bool, str]],
                lost: Callable[[], None]) -> None:
    """Answer the supervisor until it hangs up; then call `lost`."""
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        while line := await reader.readline():
            request_id, _, request = line.strip().partition(b" ")
            if request in (READY, RELOAD):
                try:
                    ok, why = ready() if request == READY else reload()
                except Exception as e:  # the line must outlive a failing handler
                    log.exception("control request %s failed", request.decode())
                    ok, why = False, f"failed: {e}"
                body = f"{int(ok)} {why}".encode()
            elif request == METRICS:
                body = exposition()
            else:
                body = b""
            writer.write(b"%s %d\n" % (request_id, len(body)) + body)
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
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[bytes]] = {}
        self._connecting = asyncio.Lock()
        self._closed: str | None = None  # why, once the line is gone
        self.answered_at = time.monotonic()  # the last answer (or the start)

    async def ask(self, request: bytes, timeout_s: float) -> bytes:
        if self._closed is not None:
            raise ControlError(f"worker {self.index}: {self._closed}")
        async with self._connecting:  # two first requests at once must share one stream
            if self._writer is None:
                reader, self._writer = await asyncio.open_connection(sock=self._sock)
                self._reading = asyncio.create_task(self._read(reader))
        request_id = next(self._ids)
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        try:
            self._writer.write(b"%d %s\n" % (request_id, request))
            async with asyncio.timeout(timeout_s):
                return await answer
        except TimeoutError:
            raise ControlError(f"worker {self.index} did not answer {request.decode()!r} "
                               f"within {timeout_s:.0f}s") from None
        except (ConnectionError, OSError) as e:
            raise ControlError(f"worker {self.index}: {e}") from None
        finally:
            self._waiting.pop(request_id, None)  # a late answer is read and dropped

    async def ready(self, timeout_s: float) -> tuple[bool, str]:
        return await self._flag(READY, timeout_s)

    async def reload(self, timeout_s: float) -> tuple[bool, str]:
        return await self._flag(RELOAD, timeout_s)

    async def _flag(self, request: bytes, timeout_s: float) -> tuple[bool, str]:
        answer = (await self.ask(request, timeout_s)).decode(errors="replace")
        flag, _, why = answer.partition(" ")
        return flag == "1", why

    async def _read(self, reader: asyncio.StreamReader) -> None:
        why = "its control line closed"
        try:
            while header := await reader.readline():
                request_id, length = map(int, header.split())
                body = await reader.readexactly(length)
                self.answered_at = time.monotonic()
                answer = self._waiting.get(request_id)
                if answer is not None and not answer.done():
                    answer.set_result(body)
        except (ConnectionError, OSError, ValueError, asyncio.IncompleteReadError) as e:
            why = f"its control line failed: {e}"
        self._closed = why
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(ControlError(f"worker {self.index}: {why}"))

    def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
        if self._writer is not None:
            self._writer.close()
        else:
            with contextlib.suppress(OSError):
                self._sock.close()
