"""The interface every model family implements (``Engine``; a family's weightless request side,
``Frontend``, and its sans-IO ``TranscriptionLoop``), and the plain data a transcription carries."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from openstt.catalog import ModelSpec
from openstt.transcript import Segment, Transcript
from openstt.vad import VadOptions

if TYPE_CHECKING:
    from openstt.messages import AlignJob, Core, WindowJob

# Whisper's fallback ladder: start at the requested temperature, step up on failure.
TEMPERATURE_STEP = 0.2
# Bounds on what a request may put in the decoder's prompt, which holds about 220 tokens in all
# (Whisper: half its 448-token context). Keywords beyond these could never fit. Of a longer
# prompt only the tail is used (as in openai/whisper); 224 tokens are rarely more than 1,500
# characters, so the last 4,000 are all that is ever tokenised.
MAX_KEYWORDS = 50
MAX_KEYWORD_CHARS = 100
MAX_PROMPT_CHARS = 4000


@dataclass(frozen=True)
class TranscribeOptions:
    task: str = "transcribe"  # or "translate" (to English)
    language: str | None = None  # ISO-639-1; None means detect
    languages: tuple[str, ...] = ()  # when detecting: the candidates (empty: any language)
    prompt: str | None = None
    keywords: tuple[str, ...] = ()  # words or phrases to bias decoding towards (prompt context)
    temperature: float = 0.0
    beam_size: int = 1  # beam search at temperature 0 (1: greedy)
    word_timestamps: bool = False
    token_logprobs: bool = False  # keep per-token logprobs (include[]=logprobs)
    # Re-decode a window at higher temperatures when the result looks like a loop or garbage.
    temperature_fallback: bool = True
    compression_ratio_threshold: float = 2.4
    logprob_threshold: float = -1.0
    no_speech_threshold: float = 0.6
    condition_on_previous_text: bool = True
    # VAD-chunked long-form mode (``engines.vad_mode``) with these VAD settings; None: sequential.
    vad: VadOptions | None = None
    # The VAD's speech probabilities when the request has them already (computed once and shared
    # with diarization); None: computed when needed.
    speech_probabilities: np.ndarray | None = field(default=None, compare=False, repr=False)
    # A live session's decode: its windows skip the queue of file windows (``WindowJob.live``).
    live: bool = False
    # The response streams its segments (SSE): in VAD-chunked mode the first chunk is decoded alone,
    # so the first text comes after one window, not after a batch of them.
    stream: bool = False

    def temperatures(self) -> tuple[float, ...]:
        if not self.temperature_fallback:
            return (self.temperature,)
        steps = int(round((1.0 - self.temperature) / TEMPERATURE_STEP))
        return tuple(round(self.temperature + i * TEMPERATURE_STEP, 2) for i in range(steps + 1)) or (1.0,)


@dataclass
class LoopState:
    """What a running transcription has learnt so far (the language, once detected)."""

    language: str | None = None
    # the request's prompt and keywords as tokens: tokenised once, off the event loop (``Engine.start``)
    prompt_tokens: list[int] = field(default_factory=list)
    keyword_tokens: list[int] = field(default_factory=list)


@dataclass
class TranscriptionRun:
    """A transcription in progress. Segments arrive as each window is decoded (which is what
    streaming sends), from a plain iterator (in-process) or an async one (model service). The
    language is known once the first window is decoded."""

    state: LoopState  # its language is None until detected
    duration: float
    segments: Iterator[Segment] | AsyncIterator[Segment]

    @property
    def language(self) -> str:
        return self.state.language or "en"

    def _transcript(self, segments: list[Segment]) -> Transcript:
        return Transcript(text="".join(s.text for s in segments).strip(), language=self.language,
                          duration=self.duration, segments=segments)

    def collect(self) -> Transcript:
        """Decode everything (in-process runs only)."""
        return self._transcript(list(self.segments))

    async def acollect(self) -> Transcript:
        """Decode everything without blocking the event loop, whatever the kind of run."""
        if hasattr(self.segments, "__aiter__"):
            return self._transcript([s async for s in self.segments])
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(self.collect)

    async def aiter(self) -> AsyncIterator[Segment]:
        if hasattr(self.segments, "__aiter__"):
            async for segment in self.segments:
                yield segment
        else:
            from starlette.concurrency import iterate_in_threadpool

            async for segment in iterate_in_threadpool(self.segments):
                yield segment


class UnsupportedRequest(ValueError):
    """The model cannot honour this request (e.g. French on an English-only model): a 400."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "unsupported_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class Engine(abc.ABC):
    """A loaded model that turns 16 kHz mono float32 audio into text.

    Implementations must be safe to call from several threads at once.
    """

    supports_word_timestamps = True
    # The weights' side, on an engine that holds them: what the model service decodes windows
    # with (``openstt.messages``); None on the API side's engines.
    core: Core | None = None

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    @abc.abstractmethod
    def start(self, audio: np.ndarray, options: TranscribeOptions) -> TranscriptionRun:
        """Validate the request and return a lazy run: nothing is decoded until its segments are
        read (a language not given is detected by the model side, on the first window)."""

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> Transcript:
        """Transcribe (or translate) one clip completely."""
        return self.start(audio, options).collect()

    def describe(self) -> dict:
        """Facts for the startup summary and logs."""
        return {"model": self.spec.name, "repo": self.spec.repo_id, "family": self.spec.family}


class TranscriptionLoop(Protocol):
    """A family's sans-IO transcription loop (Whisper's ``WindowLoop``, Voxtral's ``ChunkLoop``):
    a generator that yields ``WindowJob``/``AlignJob``s, is sent their replies, and yields
    finished ``Segment``s in between."""

    def run(self, audio: np.ndarray, options: TranscribeOptions,
            state: LoopState) -> Generator[WindowJob | AlignJob | Segment, object, None]: ...


class Frontend(Protocol):
    """The request side of a model family, without weights: checks a request's options, holds
    the tokenizer and the transcription loop (``WhisperFrontend``, ``VoxtralFrontend``). The same
    object serves an in-process engine and the API process's ``RemoteEngine``."""

    multilingual: bool
    supports_word_timestamps: bool
    loop: TranscriptionLoop

    def check(self, options: TranscribeOptions) -> None: ...

    def new_state(self, options: TranscribeOptions) -> LoopState: ...
