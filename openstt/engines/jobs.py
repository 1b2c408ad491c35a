"""What a transcription asks of a model, and the drivers that answer it.

Every engine splits a transcription in two: a sans-IO *loop* (a generator that yields a
``WindowJob`` or ``AlignJob`` whenever it needs the model and yields finished ``Segment``s in
between) and a *core* that holds the weights and answers jobs in batches. ``drive`` connects the
two in one process; ``adrive`` sends the jobs to the batching model service. The jobs and their
answers are the model service's messages (``openstt.messages``).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import TYPE_CHECKING, Protocol

import numpy as np

from openstt.audio import SAMPLE_RATE
from openstt.engines.base import Engine, LoopState, TranscribeOptions, TranscriptionRun
from openstt.transcript import Segment, Word
from openstt.messages import AlignJob, Core, DecodeResult, WindowJob
from openstt.settings import default_batch_windows

if TYPE_CHECKING:
    from openstt.device import Placement


# A window whose loudest sample is below -60 dBFS holds no speech. Whisper, fed digital silence,
# often says "you" or "Thank you." with confidence; such windows are not decoded at all.
SILENCE_PEAK = 10 ** (-60 / 20)


def is_silent(chunk: np.ndarray) -> bool:
    return not len(chunk) or float(np.abs(chunk).max()) < SILENCE_PEAK


def looks_like_loop(result: DecodeResult, job: WindowJob) -> bool:
    """Too repetitive to be speech: compresses better than the threshold (and, for a speech-only
    window, also ran to the token limit)."""
    return (job.compression_ratio_threshold is not None
            and result.compression_ratio > job.compression_ratio_threshold
            and (result.truncated or not job.speech_only))


def needs_fallback(result: DecodeResult, job: WindowJob) -> bool:
    """Whether ``result`` should be decoded again hotter: it looks like a loop or is unlikely, and
    is not a window of silence (a silent window's low logprob is expected)."""
    if result.error:
        return False
    too_repetitive = looks_like_loop(result, job)
    too_unlikely = job.logprob_threshold is not None and result.avg_logprob < job.logprob_threshold
    silent = (job.no_speech_threshold is not None and result.no_speech_prob > job.no_speech_threshold
              and too_unlikely)
    return (too_repetitive or too_unlikely) and not silent


def settle(attempts: list[DecodeResult], job: WindowJob) -> DecodeResult:
    """The result to keep from a window's attempts: the last one, unless every attempt needed a
    fallback; then, as faster-whisper does, the likeliest (highest average logprob) among those
    that do not look like a loop, else among all. openai/whisper keeps the last, temperature-1.0
    sample, which on hard audio is often mixed-script garbage."""
    if not needs_fallback(attempts[-1], job) or len(attempts) == 1:
        return attempts[-1]
    unlooped = [r for r in attempts if not looks_like_loop(r, job)]
    return max(unlooped or attempts, key=lambda r: r.avg_logprob)


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0




class TranscriptionLoop(Protocol):
    """A family's sans-IO transcription loop (Whisper's ``WindowLoop``, Voxtral's ``ChunkLoop``):
    a generator that yields ``WindowJob``/``AlignJob``s, is sent their replies, and yields
    finished ``Segment``s in between."""

    def run(self, audio: np.ndarray, options: TranscribeOptions,
            state: LoopState) -> Generator[WindowJob | AlignJob | Segment, object, None]: ...


class Frontend(Protocol):
    """The request side of a model family, without weights: checks a request's options, holds
    the tokenizer and the transcription loop (``WhisperFrontend``, ``VoxtralFrontend``). The same
    object serves an in-process engine and the API process's ``BatchedEngine``."""

    multilingual: bool
    supports_word_timestamps: bool
    loop: TranscriptionLoop

    def check(self, options: TranscribeOptions) -> None: ...

    def new_state(self, options: TranscribeOptions) -> LoopState: ...


def drive(loop: Generator, core: Core) -> Iterator[Segment]:
    """Run a transcription loop in-process, answering its requests with ``core`` directly."""
    reply = None
    while True:
        try:
            item = loop.send(reply)
        except StopIteration:
            return
        reply = None
        if isinstance(item, WindowJob):
            reply = core.decode_windows([item])[0]
        elif isinstance(item, AlignJob):
            reply = core.align(item)
        else:
            yield item


async def adrive(loop: Generator, decode: Callable[[WindowJob], Awaitable[DecodeResult]],
                 align: Callable[[AlignJob], Awaitable[list[list[Word]]]]) -> AsyncIterator[Segment]:
    """Run a transcription loop against an asynchronous (e.g. batching, remote) model service.

    Cancelled or closed (its client left), it closes the loop at once: no further window is asked for."""
    reply = None
    try:
        while True:
            try:
                item = loop.send(reply)
            except StopIteration:
                return
            reply = None
            if isinstance(item, WindowJob):
                reply = await decode(item)
            elif isinstance(item, AlignJob):
                reply = await align(item)
            else:
                yield item
    finally:
        loop.close()  # not left to the garbage collector: an exception's traceback can keep it alive


class InProcessEngine(Engine):
    """An engine that holds its weights: its ``frontend`` (tokenizer + loop, the same object the
    API process uses in the two-service layout) driven against its own ``core``."""

    frontend: Frontend
    core: Core
    # Windows decoded together in VAD-chunked mode (None: the device's default, see openstt.settings).
    max_batch_windows: int | None = None
    placement: Placement

    @property
    def supports_word_timestamps(self) -> bool:  # type: ignore[override]
        return self.frontend.supports_word_timestamps

    def start(self, audio: np.ndarray, options: TranscribeOptions) -> TranscriptionRun:
        self.frontend.check(options)
        state = self.frontend.new_state(options)
        if options.vad is not None:
            from openstt.engines.vad_chunked import drive_chunks, first_alone

            batch = self.max_batch_windows or default_batch_windows(self.placement.device.type)
            segments = drive_chunks(audio, options, lambda chunk: self.frontend.loop.run(chunk, options, state),
                                    self.core, batch, first_alone(options, self.frontend.multilingual))
        else:
            segments = drive(self.frontend.loop.run(audio, options, state), self.core)
        return TranscriptionRun(state=state, duration=len(audio) / SAMPLE_RATE, segments=segments)
