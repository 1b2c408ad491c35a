"""Cross-request batching: the messages between the API service and the model service, the
batch function, and the engine the API side uses to drive transcriptions through it.

Every transcription is a sequence of windows (Whisper's 30 s ``WindowLoop``, Voxtral's
``ChunkLoop``). The API process runs that loop per request and sends each window to the model
service; BentoML's adaptive batching gathers the windows of all concurrent requests into one
``decode_windows`` call, which decodes each model's windows in one batched pass.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

import bentoml
import numpy as np

from openstt.engines.base import Engine, TranscribeOptions, TranscriptionRun, Word
from openstt.engines.jobs import AlignJob, DecodeResult, ModelFailure, WindowJob, adrive
from openstt.metrics import metrics

log = logging.getLogger("openstt.batching")

# A window's model is not (any more) in the model service: it was unloaded while its request ran.
MODEL_NOT_LOADED = "model_not_loaded"


class WindowRequest(bentoml.IODescriptor):
    """A ``WindowJob`` on the wire (BentoML pickles it over a local socket)."""

    model: str
    audio: np.ndarray
    prompt: list[int]
    task: str
    language: str | None = None
    temperature: float = 0.0
    languages: list[str] = []
    fallback: list[float] = []
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    speech_only: bool = False
    beam_size: int = 1


def _job(request: WindowRequest) -> WindowJob:
    fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(WindowJob)}
    return WindowJob(**{**fields, "audio": np.asarray(request.audio, dtype=np.float32)})


class WindowReply(bentoml.IODescriptor):
    tokens: list[int] = []
    token_logprobs: list[float] = []
    avg_logprob: float = 0.0
    sum_logprob: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float = 0.0
    language: str = "en"
    compression_ratio: float = 0.0
    truncated: bool = False
    error: str | None = None


class AlignRequest(bentoml.IODescriptor):
    model: str
    audio: np.ndarray
    language: str
    task: str
    segment_tokens: list[list[int]]
    num_frames: int


def _reply(result: DecodeResult) -> WindowReply:
    return WindowReply(**{k: getattr(result, k) for k in WindowReply.model_fields})


def failure_reason(exc: BaseException) -> str:
    """A short, path-free reason for a failed window; ``out_of_memory`` is retryable."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "out_of_memory"
    return type(exc).__name__


def decode_batch(engines: dict[str, Engine], requests: list[WindowRequest]) -> list[WindowReply]:
    """Decode a batch of windows, grouped by model. A failing group is retried item by item so
    that one bad window fails only its own request."""
    replies: list[WindowReply | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
        groups.setdefault(req.model, []).append(i)
    for model, indices in groups.items():
        engine = engines.get(model)
        if engine is None:
            for i in indices:
                replies[i] = WindowReply(error=MODEL_NOT_LOADED)  # unloaded while its request ran
            continue
        jobs = [_job(requests[i]) for i in indices]
        started = time.perf_counter()
        try:
            results = engine.core.decode_windows(jobs)
        except Exception:
            log.exception("batch of %d windows for %s failed; retrying them one by one", len(jobs), model)
            results = []
            for job in jobs:
                try:
                    results.append(engine.core.decode_windows([job])[0])
                except Exception as exc:  # noqa: BLE001 - reported to the one request it belongs to
                    log.exception("window for %s failed", model)
                    results.append(DecodeResult([], [], 0.0, 0.0, 0.0, job.temperature, job.language or "en",
                                                error=failure_reason(exc)))
        elapsed = time.perf_counter() - started
        log.debug("decoded batch of %d windows for %s in %.2f s", len(jobs), model, elapsed)
        metrics().batch_windows.labels(model).observe(len(jobs))
        metrics().window_seconds.labels(model).observe(elapsed)
        for i, result in zip(indices, results):
            replies[i] = _reply(result)
    return replies  # type: ignore[return-value]


class ModelNotLoaded(LookupError):
    """The model service has no such model (any more): it was unloaded while a request ran."""

    def __init__(self, model: str):
        super().__init__(f"{MODEL_NOT_LOADED}: {model}")


def align_request(engine: Engine | None, request: AlignRequest) -> list[list[dict]]:
    """Model service: word times for the segments of one window, as plain dicts for the wire."""
    if engine is None:
        raise ModelNotLoaded(request.model)
    job = AlignJob(request.audio, request.language, request.task, request.segment_tokens, request.num_frames)
    words = engine.core.align(job)
    return [[{"word": w.word, "start": w.start, "end": w.end} for w in seg] for seg in words]


class BatchedEngine(Engine):
    """The API side of a model served by the model service: runs each request's transcription
    loop here (``frontend``: tokenizer + loop of any family) and sends its windows to be batched
    there."""

    def __init__(self, spec, frontend, decode: Callable[[WindowRequest], Awaitable[WindowReply]],
                 align: Callable[[AlignRequest], Awaitable[list[list[dict]]]], max_batch_windows: int = 16):
        super().__init__(spec)
        self.max_batch_windows = max_batch_windows  # windows of one request in flight in VAD-chunked mode
        self.frontend, self._decode, self._align = frontend, decode, align
        self.multilingual = frontend.multilingual
        self.supports_word_timestamps = frontend.supports_word_timestamps

    def start(self, audio: np.ndarray, options: TranscribeOptions) -> TranscriptionRun:
        self.frontend.check(options)
        state = self.frontend.new_state(options)

        async def decode(job: WindowJob) -> DecodeResult:
            fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(job)}
            reply = await self._decode(WindowRequest(model=self.name, **fields))
            return DecodeResult(**reply.model_dump())

        async def align(job: AlignJob) -> list[list[Word]]:
            try:
                words = await self._align(AlignRequest(model=self.name, audio=job.audio, language=job.language,
                                                       task=job.task, segment_tokens=job.segment_tokens,
                                                       num_frames=job.num_frames))
            except Exception as exc:
                if MODEL_NOT_LOADED in str(exc):  # unloaded while this request ran
                    raise ModelFailure(MODEL_NOT_LOADED) from None
                raise
            return [[Word(**w) for w in seg] for seg in words]

        if options.vad is not None:
            from openstt.engines.vad_chunked import adrive_chunks

            segments = adrive_chunks(audio, options, lambda chunk: self.frontend.loop.run(chunk, options, state),
                                     decode, align, self.max_batch_windows)
        else:
            segments = adrive(self.frontend.loop.run(audio, options, state), decode, align)
        return TranscriptionRun(state=state, duration=len(audio) / 16000, segments=segments)

    def describe(self) -> dict:
        return {**super().describe(), "served_by": "model service (batched)", "multilingual": self.multilingual}


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
