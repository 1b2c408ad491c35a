"""The model service's protocol, defined once: its messages, its error codes, the functions that
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
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Protocol

import bentoml
import numpy as np
from pydantic import Field, field_validator

from openstt.diarization.clustering import MAX_SPEAKERS
from openstt.engines.base import Engine, Word
from openstt.metrics import metrics

if TYPE_CHECKING:
    from openstt.diarization.pipeline import Diarizer
    from openstt.model_manager import WeightsManager

log = logging.getLogger("openstt.model_service")


class ErrorCode(str, enum.Enum):
    """Why the model service could not answer; crosses the wire as itself."""

    model_not_loaded = "model_not_loaded"  # not (any more) in the model service: unloaded while its request ran
    out_of_memory = "out_of_memory"  # the device ran out of memory on this window (retryable)
    failed = "failed"  # any other failure (logged with its traceback by the model service)
    # loading weights at runtime
    unknown_model = "unknown_model"
    insufficient_memory = "insufficient_memory"  # the memory check refused it
    not_available = "not_available"  # not in the cache, and downloading is off
    download_failed = "download_failed"
    unsupported_family = "unsupported_family"
    default_model = "default_model"  # unloading the default model
    diarization_disabled = "diarization_disabled"  # the model service was started without --enable-diarization

    def __str__(self) -> str:  # the code itself in messages and labels, on every Python version
        return self.value


def _float32(audio) -> np.ndarray:
    return np.asarray(audio, dtype=np.float32)  # no copy when it is float32 already


class WindowJob(bentoml.IODescriptor):
    """One window of audio to decode (at most 30 s for Whisper, one chunk for Voxtral): what a
    transcription asks of the model, and the unit that is batched across requests."""

    audio: np.ndarray  # at most 30 s of 16 kHz float32
    prompt: list[int]  # previous text tokens (context)
    task: str
    language: str | None  # None: detect it from this window
    temperature: float
    languages: list[str] = Field(default_factory=list)  # detection candidates (empty: any)
    # Whisper's fallback ladder, run by the model service on the window's one encoding: the
    # temperatures to try after ``temperature`` while the result looks like a loop (compression
    # ratio above the threshold) or garbage (average logprob below it), unless it is silence.
    fallback: list[float] = Field(default_factory=list)
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    # Speech only (a VAD chunk): its text may well repeat itself (the silences between repeated
    # phrases are cut out), so a high compression ratio counts as a loop only when decoding also
    # ran to the token limit without ending, as a real loop does.
    speech_only: bool = False
    beam_size: int = 1  # beam search at temperature 0 when > 1 (sampled fallbacks use best-of)
    # The window's words will be timed next (an ``AlignJob`` of the same audio): keep its encoder
    # output for that, instead of encoding the window a second time.
    keep_encoding: bool = False
    model: str = ""  # the catalog model to decode with (set by the API side's engine)
    # A live session's window (WebSocket): sent through its own batching queue, so it waits at most
    # for the batch of file windows being decoded, never behind the queued ones.
    live: bool = False

    _audio = field_validator("audio")(_float32)


class DecodeResult(bentoml.IODescriptor):
    tokens: list[int] = Field(default_factory=list)  # sampled tokens without eot (text and timestamps)
    token_logprobs: list[float] = Field(default_factory=list)
    avg_logprob: float = 0.0
    sum_logprob: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float = 0.0
    language: str = "en"
    compression_ratio: float = 0.0
    truncated: bool = False  # decoding hit the token limit without end-of-text
    error: ErrorCode | None = None  # set when this item failed; its batch-mates are unaffected


class AlignJob(bentoml.IODescriptor):
    """Word timing for the segments of one decoded window."""

    audio: np.ndarray
    language: str
    task: str
    segment_tokens: list[list[int]]  # text tokens of each segment
    num_frames: int
    model: str = ""

    _audio = field_validator("audio")(_float32)


class AlignReply(bentoml.IODescriptor):
    words: list[list[Word]] = Field(default_factory=list)  # per segment, times relative to the window
    error: ErrorCode | None = None


class WeightsReply(bentoml.IODescriptor):
    """The model service's answer to loading or unloading a model's weights."""

    loaded: bool = False  # False with no error: it was loaded already
    unloaded: bool = False  # False with no error: it was not loaded
    created: int = 0  # when it was loaded (Unix time)
    error: ErrorCode | None = None
    message: str = ""  # for the client, path-free


class SpeakerTurn(bentoml.IODescriptor):
    start: float  # seconds
    end: float
    speaker: str  # a known speaker's name, or A, B, C... in order of appearance


class DiarizeJob(bentoml.IODescriptor):
    """Who spoke when in one request's audio (runs while its windows are transcribed)."""

    audio: np.ndarray  # 16 kHz float32, the whole file
    # The VAD's speech probabilities, computed once per request and shared with the transcription
    # (empty: the model service computes them).
    probabilities: np.ndarray = Field(default_factory=lambda: np.zeros(0, np.float32))
    references: list[np.ndarray] = Field(default_factory=list)  # known speakers' voices, 1-10 s each
    names: list[str] = Field(default_factory=list)  # their names, paired by position
    num_speakers: int | None = None  # None: estimated from the audio, between these two
    min_speakers: int = 1
    max_speakers: int = MAX_SPEAKERS

    _audio = field_validator("audio", "probabilities")(_float32)

    @field_validator("references")
    @classmethod
    def _references(cls, value: list) -> list[np.ndarray]:
        return [_float32(v) for v in value]


class DiarizeReply(bentoml.IODescriptor):
    turns: list[SpeakerTurn] = Field(default_factory=list)  # in time order
    error: ErrorCode | None = None


class ModelFailure(RuntimeError):
    """The model could not answer a window (``code`` is e.g. ``ErrorCode.out_of_memory``)."""

    def __init__(self, code: ErrorCode, at_seconds: float = 0.0):
        super().__init__(f"decoding the window at {at_seconds:.1f} s failed: {code}")
        self.code = code


class Core(Protocol):
    """The model side of an engine: decodes windows of any requests together."""

    def decode_windows(self, jobs: list[WindowJob]) -> list[DecodeResult]: ...

    def align(self, job: AlignJob) -> list[list[Word]]: ...


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
