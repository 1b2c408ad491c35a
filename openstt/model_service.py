"""The model service's two sides, over the messages of ``openstt.messages``: the functions that
answer them next to the weights, and the client the API process calls it with.

The API process runs each request's transcription loop and asks the model service (the process
holding the weights, ``service.py``'s ``OpenSTTModels``) to decode each window (``WindowJob`` ->
``DecodeResult``), to time the words of a decoded window (``AlignJob`` -> ``AlignReply``) and,
for runtime model management, to load and unload weights (-> ``WeightsReply``). The message
classes are at once the in-process form (what a loop yields, what an engine's ``Core`` answers)
and the wire form (BentoML pickles them over a local socket), and a failure crosses as an
``ErrorCode``, never as an exception to string-match.

Model side: ``decode_batch`` and ``align_request``. API side: ``ModelServiceClient`` (over
BentoML) and ``InMemoryModelService`` (the same functions in this process: tests, one process).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from openstt.engines.base import Engine
from openstt.messages import (AlignJob, AlignReply, DecodeResult, DiarizeJob, DiarizeReply, ErrorCode, SpeakerTurn,
                              WeightsReply, WindowJob)
from openstt.metrics import metrics

if TYPE_CHECKING:
    from openstt.diarization.pipeline import Diarizer
    from openstt.model_manager import WeightsManager

log = logging.getLogger("openstt.model_service")


# --- model side -----------------------------------------------------------------------------------

def failure_reason(exc: BaseException) -> ErrorCode:
    """A failed window's code; ``out_of_memory`` is retryable."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return ErrorCode.out_of_memory
    return ErrorCode.failed


def decode_batch(engines: Mapping[str, Engine], jobs: list[WindowJob]) -> list[DecodeResult]:
    """Decode a batch of windows, grouped by model. A failing group is retried item by item so
    that one bad window fails only its own request."""
    replies: list[DecodeResult | None] = [None] * len(jobs)
    groups: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.model, []).append(i)
    for model, indices in groups.items():
        _decode_group(engines, model, indices, jobs, replies)
    return replies  # type: ignore[return-value]


def _decode_group(engines: Mapping[str, Engine], model: str, indices: list[int], jobs: list[WindowJob],
                  replies: list[DecodeResult | None]) -> None:
    """Decode the windows ``indices`` of ``jobs`` with ``model`` in one pass, into ``replies``."""
    engine = engines.get(model)
    core = engine.core if engine is not None else None
    if core is None:
        for i in indices:  # unloaded while its request ran
            replies[i] = DecodeResult(error=ErrorCode.model_not_loaded)
        return
    group = [jobs[i] for i in indices]
    started = time.perf_counter()
    try:
        results = core.decode_windows(group)
    except Exception:
        log.exception("batch of %d windows for %s failed; retrying them one by one", len(group), model)
        results = []
        for job in group:
            try:
                results.append(core.decode_windows([job])[0])
            except Exception as exc:  # reported to the one request it belongs to
                log.exception("window for %s failed", model)
                results.append(DecodeResult(temperature=job.temperature, language=job.language or "en",
                                            error=failure_reason(exc)))
    elapsed = time.perf_counter() - started
    log.debug("decoded batch of %d windows for %s in %.2f s", len(group), model, elapsed)
    metrics().batch_windows.labels(model).observe(len(group))
    metrics().window_seconds.labels(model).observe(elapsed)
    for i, result in zip(indices, results):
        replies[i] = result


def align_request(engine: Engine | None, job: AlignJob) -> AlignReply:
    """Word times for the segments of one window."""
    core = engine.core if engine is not None else None
    if core is None:
        return AlignReply(error=ErrorCode.model_not_loaded)  # unloaded while its request ran
    try:
        return AlignReply(words=core.align(job))
    except Exception as exc:  # reported to the request it belongs to
        log.exception("aligning a window for %s failed", job.model)
        return AlignReply(error=failure_reason(exc))


def diarize_request(diarizer: Diarizer | None, job: DiarizeJob) -> DiarizeReply:
    """The speaker turns of one request's audio."""
    if diarizer is None:
        return DiarizeReply(error=ErrorCode.diarization_disabled)
    started = time.perf_counter()
    try:
        known = {name: diarizer.voice(audio) for name, audio in zip(job.names, job.references)}
        turns = diarizer.diarize(job.audio, probabilities=job.probabilities if len(job.probabilities) else None,
                                 known=known,
                                 num_speakers=job.num_speakers, min_speakers=job.min_speakers,
                                 max_speakers=job.max_speakers)
    except Exception as exc:  # reported to the request it belongs to
        log.exception("diarizing %.1f s of audio failed", len(job.audio) / 16000)
        metrics().diarization_failures.inc()
        return DiarizeReply(error=failure_reason(exc))
    elapsed = time.perf_counter() - started
    metrics().diarization_seconds.observe(elapsed)
    metrics().diarization_audio_seconds.inc(len(job.audio) / 16000)
    log.debug("diarized %.1f s of audio in %.2f s: %d turns, %d speakers", len(job.audio) / 16000, elapsed,
              len(turns), len({t.speaker for t in turns}))
    return DiarizeReply(turns=[SpeakerTurn(start=t.start, end=t.end, speaker=t.speaker) for t in turns])


# --- API side -------------------------------------------------------------------------------------

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


class InMemoryModelService(ModelServiceClient):
    """The model service in this process, as the real one runs it: the same functions on the
    engines that ``engines()`` returns by name (e.g. a ``ModelRegistry``'s ``engines``), on a
    ``ComputeThread`` of its own. Loading and unloading need ``weights``."""

    def __init__(self, engines: Callable[[], Mapping[str, Engine]], weights: WeightsManager | None = None,
                 diarizer: Diarizer | None = None, max_batch: int = 1):
        from openstt.compute import ComputeThread

        self.engines, self.weights, self.diarizer = engines, weights, diarizer
        self.compute = ComputeThread(engines, max_batch=max_batch, name="openstt-compute-inmemory")

    async def decode(self, job: WindowJob) -> DecodeResult:
        return (await self.compute.decode([job]))[0]

    async def align(self, job: AlignJob) -> AlignReply:
        return await self.compute.run(lambda: align_request(self.engines().get(job.model), job))

    async def diarize(self, job: DiarizeJob) -> DiarizeReply:
        return await self.compute.run(diarize_request, self.diarizer, job)

    async def ready(self) -> bool:
        return True

    async def load(self, name: str) -> WeightsReply:
        from openstt.compute import run_aside

        if self.weights is None:
            raise NotImplementedError("this model service cannot load models")
        return await run_aside(self.weights.load, name)

    async def unload(self, name: str) -> WeightsReply:
        from openstt.compute import run_aside

        if self.weights is None:
            raise NotImplementedError("this model service cannot unload models")
        return await run_aside(self.weights.unload, name)
