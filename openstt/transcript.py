"""What a transcription produces: words, token log-probabilities, segments and the transcript.
Plain data at the bottom of the package: every layer uses it, it imports nothing of ours."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Word:
    word: str
    start: float
    end: float
    speaker: str | None = None  # who said it, when the request asked for diarization


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]


@dataclass
class Segment:
    id: int
    seek: int  # window offset in 10 ms mel frames
    start: float
    end: float
    text: str  # with Whisper's leading space
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Word] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    speaker: str | None = None  # who said it, when the request asked for diarization


@dataclass
class Transcript:
    text: str
    language: str  # ISO-639-1 code, detected or given
    duration: float  # seconds of input audio
    segments: list[Segment] = field(default_factory=list)

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in s.words]
