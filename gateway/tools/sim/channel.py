"""Messages between the simulator's processes: frames of a 4-byte length and a pickled
object, over a child's stdin and stdout (gateway/tools/sim/shard.py, witness.py).

Only ever between a simulator and the children it started: pickle is safe here, and it
carries pydantic models and arrays as they are. A child never prints to stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import struct
import sys
from typing import Any

_LENGTH = struct.Struct("!I")


def frame(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message; EOFError when the other side has closed its end."""
    try:
        header = await reader.readexactly(_LENGTH.size)
        body = await reader.readexactly(_LENGTH.unpack(header)[0])
    except asyncio.IncompleteReadError:
        raise EOFError from None
    return pickle.loads(body)


class Parent:
    """A child's line to the process that started it: frames in on stdin, out on stdout
    (written blocking: they are few, and the parent reads them at once)."""

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader(limit=2**26)
        self._out = sys.stdout.buffer
        # Anything printed by mistake goes to stderr instead of corrupting the frames.
        sys.stdout = sys.stderr

    async def open(self) -> Parent:
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(self.reader),
                                     os.fdopen(sys.stdin.fileno(), "rb", buffering=0, closefd=False))
        return self

    async def receive(self) -> Any:
        return await read_frame(self.reader)

    def send(self, message: Any) -> None:
        with contextlib.suppress(BrokenPipeError):  # the parent is gone: nobody to tell
            self._out.write(frame(message))
            self._out.flush()
