"""Requests to LwM2M devices that registered over coaps: through aiocoap's DTLS server
context, on the device's own session (the only way a DTLS device can be reached).

The same interface as `requests.Requester`, so the LwM2M server does not care which one
carries a request. aiocoap retransmits, matches and ACKs here; two differences follow
from that and are documented (docs/operations.md): a CON notification is ACKed by
aiocoap on receipt, not once its reading is durable, and an observation ends with the
DTLS session (a gateway restart), to be set up again when the device next speaks.
It never raises into its caller: a failed request ends with None.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiocoap
from aiocoap.numbers.codes import Code

from gateway.ingest.coap import numbers as C
from gateway.ingest.coap import wire
from gateway.ingest.lwm2m.requests import Done, Notify, no_ack

log = logging.getLogger(__name__)


class DtlsRequester:
    def __init__(self, context: Any) -> None:
        self._context = context
        self._tasks: set[asyncio.Task[None]] = set()
        self._observations: dict[bytes, Any] = {}  # token -> aiocoap's observation

    def request(self, remote: Any, code: int, options: list[tuple[int, bytes]],
                payload: bytes, done: Done, *, on_notify: Notify | None = None) -> None:
        message = aiocoap.Message(code=Code(code), payload=payload)
        message.remote = remote
        paths, queries = [], []
        for number, value in options:
            if number == C.URI_PATH:
                paths.append(value.decode())
            elif number == C.URI_QUERY:
                queries.append(value.decode())
            elif number == C.CONTENT_FORMAT:
                message.opt.content_format = wire.uint_of(value)
            elif number == C.ACCEPT:
                message.opt.accept = wire.uint_of(value)
            elif number == C.OBSERVE:
                message.opt.observe = wire.uint_of(value)
        message.opt.uri_path = tuple(paths)
        message.opt.uri_query = tuple(queries)
        task = asyncio.get_running_loop().create_task(
            self._exchange(message, remote, done, on_notify), name="lwm2m-dtls-request")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, token: bytes) -> None:
        observation = self._observations.pop(token, None)
        if observation is not None:
            observation.cancel()

    async def _exchange(self, message: aiocoap.Message, remote: Any, done: Done,
                        on_notify: Notify | None) -> None:
        response: wire.Message | None = None
        try:
            request = self._context.request(message)
            answer = await request.response
            response = _as_wire(answer)
        except Exception as e:  # aiocoap's own timeouts and session errors: unanswered
            log.info("lwm2m: request over coaps to %s ended without an answer: %s",
                     getattr(remote, "hostinfo", remote), e)
            request = None
        _call(done, response)
        if request is None or response is None or on_notify is None:
            return
        if response.code >> 5 != 2 or answer.opt.observe is None:
            return
        self._observations[response.token] = request.observation
        address = (str(getattr(remote, "hostinfo", "")), 0)
        on_notify(response, address, no_ack)  # the first answer carries a reading too
        try:
            async for notification in request.observation:
                on_notify(_as_wire(notification), address, no_ack)
        except Exception as e:  # the session ended, or the device cancelled
            log.info("lwm2m: observation over coaps of %s ended: %s",
                     getattr(remote, "hostinfo", remote), e)
        finally:
            self._observations.pop(response.token, None)

    async def close(self) -> None:
        for observation in self._observations.values():
            observation.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _as_wire(message: aiocoap.Message) -> wire.Message:
    options: list[tuple[int, bytes]] = []
    if message.opt.observe is not None:
        options.append((C.OBSERVE, wire.uint_value(int(message.opt.observe))))
    if message.opt.content_format is not None:
        options.append((C.CONTENT_FORMAT, wire.uint_value(int(message.opt.content_format))))
    return wire.Message(C.ACK, int(message.code), 0, bytes(message.token or b""), options,
                        bytes(message.payload))


def _call(done: Callable[[wire.Message | None], None], response: wire.Message | None) -> None:
    try:
        done(response)
    except Exception:
        log.exception("callback of a request over coaps failed")
