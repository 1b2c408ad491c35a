"""What a transcription asks of a model, and the drivers that answer it.

Every engine splits a transcription in two: a sans-IO *loop* (a generator that yields a
``WindowJob`` or ``AlignJob`` whenever it needs the model and yields finished ``Segment``s in
between) and a *core* that holds the weights and answers jobs in batches. ``drive`` connects the
two in one process; ``adrive`` sends the jobs to the batching model service (``openstt.batching``).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from openstt.audio import SAMPLE_RATE
from openstt.engines.base import Engine, Segment, TranscribeOptions, TranscriptionRun, Word


@dataclass
class WindowJob:
    """One window of audio to decode (at most 30 s for Whisper, one chunk for Voxtral): what a
    transcription asks of the model, and the unit that is batched across requests."""

    audio: np.ndarray  # at most 30 s of 16 kHz float32
    prompt: list[int]  # previous text tokens (context)
    task: str
    language: str | None  # None: detect it from this window
    temperature: float
    languages: list[str] = field(default_factory=list)  # detection candidates (empty: any)
    # Whisper's fallback ladder, run by the model service on the window's one encoding: the
    # temperatures to try after ``temperature`` while the result looks like a loop (compression
    # ratio above the threshold) or garbage (average logprob below it), unless it is silence.
    fallback: list[float] = field(default_factory=list)
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    # Speech only (a VAD chunk): its text may well repeat itself (the silences between repeated
    # phrases are cut out), so a high compression ratio counts as a loop only when decoding also
    # ran to the token limit without ending, as a real loop does.
    speech_only: bool = False
    beam_size: int = 1  # beam search at temperature 0 when > 1 (sampled fallbacks use best-of)


@dataclass
class DecodeResult:
    tokens: list[int]  # sampled tokens without eot (text and timestamps)
    token_logprobs: list[float]
    avg_logprob: float
    sum_logprob: float
    no_speech_prob: float
    temperature: float
    language: str
    compression_ratio: float = 0.0
    truncated: bool = False  # decoding hit the token limit without end-of-text
    error: str | None = None  # set when this item failed; its batch-mates are unaffected


@dataclass
class AlignJob:
    """Word timing for the segments of one decoded window."""

    audio: np.ndarray
    language: str
    task: str
    segment_tokens: list[list[int]]  # text tokens of each segment
    num_frames: int


class ModelFailure(RuntimeError):
    """The model could not decode a window (``reason`` is e.g. ``out_of_memory``)."""

    def __init__(self, reason: str, at_seconds: float = 0.0):
        super().__init__(f"decoding the window at {at_seconds:.1f} s failed: {reason}")
        self.reason = reason


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


class Core(Protocol):
    """The model side of an engine: decodes windows of any requests together."""

    def decode_windows(self, jobs: list[WindowJob]) -> list[DecodeResult]: ...

    def align(self, job: AlignJob) -> list[list[Word]]: ...


@dataclass
class LoopState:
    """What a running transcription has learnt so far (the language, once detected)."""

    language: str | None = None
    extra: dict = field(default_factory=dict)


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

    frontend: object  # has check(options), new_state(options), loop, supports_word_timestamps
    core: Core
    max_batch_windows = 16  # windows decoded together in VAD-chunked mode

    @property
    def supports_word_timestamps(self) -> bool:  # type: ignore[override]
        return self.frontend.supports_word_timestamps

    def start(self, audio: np.ndarray, options: TranscribeOptions) -> TranscriptionRun:
        self.frontend.check(options)
        state = self.frontend.new_state(options)
        if options.vad is not None:
            from openstt.engines.vad_chunked import drive_chunks

            segments = drive_chunks(audio, options, lambda chunk: self.frontend.loop.run(chunk, options, state),
                                    self.core, self.max_batch_windows)
        else:
            segments = drive(self.frontend.loop.run(audio, options, state), self.core)
        return TranscriptionRun(state=state, duration=len(audio) / SAMPLE_RATE, segments=segments)
