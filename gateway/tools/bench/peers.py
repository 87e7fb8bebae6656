"""The benchmark's reference server: a bare aiocoap server whose root resource
answers 2.04 to any POST or PUT, whatever the path, and does nothing else.
Run as `python -m gateway.tools.bench.peers --port P`."""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiocoap
import aiocoap.resource


class Changed(aiocoap.resource.Resource):  # type: ignore[misc]
    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CHANGED)

    render_put = render_post


async def serve(port: int) -> None:
    ctx = await aiocoap.Context.create_server_context(Changed(), bind=("127.0.0.1", port),
                                                      transports=["udp6"])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await ctx.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    asyncio.run(serve(p.parse_args().port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
