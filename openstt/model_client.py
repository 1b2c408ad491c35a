"""The API process's side of the model service: ``ModelServiceClient`` sends the messages of
``openstt.messages`` to the model service (``service.py``'s ``OpenSTTModels``, a BentoML
dependency) and gets their answers back. The test double that runs ``openstt.serving`` in the same
process is ``tests/inmemory.py``'s ``InMemoryModelService``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from openstt.messages import AlignJob, AlignReply, DecodeResult, DiarizeJob, DiarizeReply, WeightsReply, WindowJob

log = logging.getLogger("openstt.model_client")


async def call_with_reconnect(call: Callable[[], Awaitable], attempts: int = 3):
    """Call the model service, retrying when a pooled keep-alive connection turns out to be closed.

    The model service's server drops idle connections after a few seconds; a request that picks
    such a connection fails with "Server disconnected" before the service saw it, so retrying is
    safe (decoding a window has no side effects)."""
    import aiohttp

    for attempt in range(attempts):
        try:
            return await call()
        except aiohttp.ClientConnectionError:
            if attempt == attempts - 1:
                raise
            log.debug("model service connection dropped; retrying (%d)", attempt + 1)


class ModelServiceClient:
    """The API process's handle on the model service: ``service`` is the BentoML dependency
    (``bentoml.depends(OpenSTTModels)``); every call survives a dropped keep-alive connection.

    Windows asked for in the same turn of the event loop (a long file's chunks, started together)
    travel in one ``decode_windows`` call, so they reach the model service's queue together and are
    decoded as one batch; nothing waits for more to come."""

    def __init__(self, service):
        self.service = service
        self._pending: list[tuple[WindowJob, asyncio.Future]] = []

    async def decode(self, job: WindowJob) -> DecodeResult:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._send)  # after the tasks already runnable in this turn
        self._pending.append((job, future))
        return await future

    def _send(self) -> None:
        pending, self._pending = self._pending, []
        futures = [f for _, f in pending]
        task = asyncio.ensure_future(self._decode([job for job, _ in pending], futures))

        def caller_left(_):  # every caller cancelled: cancel the call, so their windows are dropped
            if not task.done() and all(f.done() for f in futures):
                task.cancel()

        for f in futures:
            f.add_done_callback(caller_left)

    async def _decode(self, jobs: list[WindowJob], futures: list[asyncio.Future]) -> None:
        try:
            results = await call_with_reconnect(lambda: self.service.to_async.decode_windows(jobs))
        except (Exception, asyncio.CancelledError) as exc:
            for f in futures:
                if not f.done():
                    f.cancel() if isinstance(exc, asyncio.CancelledError) else f.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for f, result in zip(futures, results):
            if not f.done():
                f.set_result(result)

    async def align(self, job: AlignJob) -> AlignReply:
        return await call_with_reconnect(lambda: self.service.to_async.align(job))

    async def diarize(self, job: DiarizeJob) -> DiarizeReply:
        return await call_with_reconnect(lambda: self.service.to_async.diarize(job))

    async def ready(self) -> bool:
        return await call_with_reconnect(lambda: self.service.to_async.ready())

    async def load(self, name: str) -> WeightsReply:
        return await call_with_reconnect(lambda: self.service.to_async.load_model(name))

    async def unload(self, name: str) -> WeightsReply:
        return await call_with_reconnect(lambda: self.service.to_async.unload_model(name))
