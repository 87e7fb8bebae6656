"""The simulator's child processes as its parent sees them: the witness and the fleet
processes, each `main()` of `gateway.tools.sim.<module>` running this very checkout, in a session
of its own (a Ctrl-C reaches only the parent, which stops them in order), talking in
frames over its stdin and stdout (gateway/tools/sim/channel.py).

It never leaves a child running: `stop()` terminates, then kills.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import gateway
from gateway.tools.sim.channel import frame, read_frame

STOP_TIMEOUT_S = 5.0
_PACKAGE_ROOT = str(Path(gateway.__file__).resolve().parent.parent)


class SimulatorError(Exception):
    """A part of the simulator failed: the run proves nothing."""


class WitnessError(SimulatorError):
    """The witness lost (or never had) its broker connection, or died."""


class Child:
    def __init__(self, name: str, proc: asyncio.subprocess.Process,
                 error: type[SimulatorError]) -> None:
        self.name = name
        self.proc = proc
        self.error = error  # what its failures raise

    @classmethod
    async def start(cls, name: str, module: str, pass_fds: tuple[int, ...] = (),
                    error: type[SimulatorError] = SimulatorError) -> Child:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        proc = await asyncio.create_subprocess_exec(
            # -c, not -m: classes pickled by the child belong to `module`, not `__main__`
            sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, pass_fds=pass_fds, env=env, start_new_session=True)
        return cls(name, proc, error)

    async def send(self, message: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(frame(message))
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise self.error(f"the {self.name} has gone ({await self._exit()})") from None

    async def receive(self) -> tuple[str, Any]:
        """The next (kind, payload) the child sent; SimulatorError if it exited instead."""
        assert self.proc.stdout is not None
        try:
            kind, payload = await read_frame(self.proc.stdout)
        except EOFError:
            raise self.error(f"the {self.name} exited ({await self._exit()})") from None
        return str(kind), payload

    async def expect(self, kind: str, timeout_s: float) -> Any:
        """The payload of the next message, which must be of `kind`."""
        try:
            async with asyncio.timeout(timeout_s):
                got, payload = await self.receive()
        except TimeoutError:
            raise self.error(f"the {self.name} did not say {kind!r} within {timeout_s:.0f} s"
                                 ) from None
        if got == "failed":
            raise self.error(str(payload))
        if got != kind:
            raise self.error(f"the {self.name} said {got!r}, not {kind!r}")
        return payload

    def close_input(self) -> None:
        """The end of its stdin: the child's cue to finish."""
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()

    async def _exit(self) -> str:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT_S):
                code = await self.proc.wait()
                return f"exit code {code}"
        return "still running"

    async def stop(self) -> None:
        """Wait briefly for a child told to finish; terminate it, then kill it."""
        self.close_input()
        for signal_it in (None, self.proc.terminate, self.proc.kill):
            if self.proc.returncode is not None:
                break
            if signal_it is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal_it()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await self.proc.wait()
