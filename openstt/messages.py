"""The model service's protocol, at the bottom of the package: the messages the API process and
the model service exchange, their error codes, and what either side must provide.

The API process runs each request's transcription loop and asks the model service (the process
holding the weights, ``service.py``'s ``OpenSTTModels``) to decode each window (``WindowJob`` ->
``DecodeResult``), to time the words of a decoded window (``AlignJob`` -> ``AlignReply``), to
diarize (``DiarizeJob`` -> ``DiarizeReply``) and, for runtime model management, to load and unload
weights (-> ``WeightsReply``). The message classes are at once the in-process form (what a loop
yields, what an engine's ``Core`` answers) and the wire form (BentoML pickles them over a local
socket), and a failure crosses as an ``ErrorCode``, never as an exception to string-match.
Importing this module imports neither torch nor ``openstt.engines`` (an import-linter contract).
"""

from __future__ import annotations

import enum
from typing import Protocol

import bentoml
import numpy as np
from pydantic import Field, field_validator

from openstt.transcript import Word

# The most speakers a diarization may find (its eigengap search's bound) and a request may ask for.
MAX_SPEAKERS = 15


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


class ModelService(Protocol):
    """What the API process calls the model service with: ``ModelServiceClient`` over BentoML,
    or the in-memory double of the tests."""

    async def decode(self, job: WindowJob) -> DecodeResult: ...

    async def align(self, job: AlignJob) -> AlignReply: ...

    async def diarize(self, job: DiarizeJob) -> DiarizeReply: ...

    async def ready(self) -> bool: ...

    async def load(self, name: str) -> WeightsReply: ...

    async def unload(self, name: str) -> WeightsReply: ...
