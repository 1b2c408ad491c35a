"""The interface every model family implements, and the plain data it exchanges."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np

from openstt.catalog import ModelSpec


@dataclass(frozen=True)
class TranscribeOptions:
    task: str = "transcribe"  # or "translate" (to English)
    language: str | None = None  # ISO-639-1; None means detect
    prompt: str | None = None
    temperature: float = 0.0


@dataclass
class Transcript:
    text: str
    language: str  # ISO-639-1 code, detected or given
    duration: float  # seconds of input audio
    segments: list[dict] = field(default_factory=list)


class UnsupportedRequest(ValueError):
    """The model cannot honour this request (e.g. French on an English-only model): a 400."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "unsupported_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class Engine(abc.ABC):
    """A loaded model that turns 16 kHz mono float32 audio into text.

    Implementations must be safe to call from several threads at once.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    @abc.abstractmethod
    def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> Transcript:
        """Transcribe (or translate) one clip."""

    def describe(self) -> dict:
        """Facts for the startup summary and logs."""
        return {"model": self.spec.name, "repo": self.spec.repo_id, "family": self.spec.family}
