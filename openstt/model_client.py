"""The API process's side of the model service: ``ModelServiceClient`` sends the messages of
``openstt.messages`` to the model service (``service.py``'s ``OpenSTTModels``, a BentoML
dependency) and gets their answers back. The test double that runs ``openstt.serving`` in the same
process is ``tests/inmemory.py``'s ``InMemoryModelService``.
"""

from __future__ import annotations

import asyncio

from openstt.errors import ModelManagementReplicated
from openstt.messages import AlignJob, AlignReply, DecodeResult, DiarizeJob, DiarizeReply, WeightsReply, WindowJob
from openstt.replicas import OneService, ReplicaPool


class ModelServiceClient:
    """The API process's handle on the model service: ``service`` is the BentoML dependency
    (``bentoml.depends(OpenSTTModels)``), or a ``ReplicaPool`` of model-service replicas reached
    over HTTP; every call survives a dropped keep-alive connection (and, pooled, a dead replica).

    Windows asked for in the same turn of the event loop (a long file's chunks, started together)
    travel in one ``decode_windows`` call, so they reach the model service's queue together and are
    decoded as one batch; nothing waits for more to come."""

    def __init__(self, service):
        pooled = isinstance(service, (OneService, ReplicaPool))
        self.replicas: OneService | ReplicaPool = service if pooled else OneService(service)
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
            results = await self.replicas.call("decode_windows", jobs, cost=len(jobs))
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
        return await self.replicas.call("align", job)

    async def diarize(self, job: DiarizeJob) -> DiarizeReply:
        return await self.replicas.call("diarize", job)

    async def ready(self) -> bool:
        return await self.replicas.ready()

    def status(self) -> dict | None:
        """How many model-service replicas answered the last probe (None: one, in this server)."""
        return self.replicas.status()

    @property
    def manageable(self) -> bool:
        """Whether loading a model reaches every model service: not when replicas can differ."""
        return self.replicas.single

    def check_manageable(self) -> None:
        if not self.manageable:
            raise ModelManagementReplicated(len(self.replicas.replicas))

    async def load(self, name: str) -> WeightsReply:
        self.check_manageable()
        return await self.replicas.call("load_model", name)

    async def unload(self, name: str) -> WeightsReply:
        self.check_manageable()
        return await self.replicas.call("unload_model", name)
