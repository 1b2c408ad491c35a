"""How speech probabilities become speech regions: ``VadOptions``, Silero's parameters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VadOptions:
    """How speech probabilities become speech regions (Silero's parameters, in ms).

    threshold: a frame at or above it starts speech. Speech ends after ``min_silence_ms`` of frames
        below ``neg_threshold`` (default ``threshold - 0.15``, Silero's hysteresis).
    min_silence_ms: shorter pauses stay inside a region. Regions are also where chunks may be cut,
        so short pauses give the chunk planner more places to cut.
    speech_pad_ms: added before and after each region (half the gap when two regions are closer
        than twice this), so word onsets and tails are kept. OpenAI's ``prefix_padding_ms``.
    min_speech_ms: regions with less speech than this (before padding) are dropped: clicks, coughs.

    The defaults are OpenAI's ``server_vad`` ones (so ``"auto"`` and a bare ``server_vad`` agree)
    plus Silero's 250 ms minimum. On 10 min of read speech, 100 / 200 / 500 / 2000 ms of silence
    gave 147 / 74 / 40 / 6 regions, 0 / 1 / 3 / 5 of them over 30 s (to be cut inside speech), and
    the same 89 % of the audio kept with no speech lost. (faster-whisper's 2000 ms default is for its
    sequential mode, which only drops long silences; its batched mode uses 160 ms.) Single spoken
    digits (0.35-0.7 s of speech) pass the 250 ms minimum.
    """

    threshold: float = 0.5
    min_silence_ms: int = 200
    speech_pad_ms: int = 300
    min_speech_ms: int = 250
    neg_threshold: float | None = None

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {self.threshold}")
        if self.neg_threshold is not None and not 0.0 <= self.neg_threshold <= self.threshold:
            raise ValueError(f"neg_threshold must be between 0 and threshold, got {self.neg_threshold}")
        for name in ("min_silence_ms", "speech_pad_ms", "min_speech_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")

    @property
    def exit_threshold(self) -> float:
        """Below this a frame counts as silence while in speech (Silero: threshold - 0.15, at least 0.01)."""
        return self.neg_threshold if self.neg_threshold is not None else max(self.threshold - 0.15, 0.01)
