"""Turn detection on a live stream (OpenAI's ``server_vad``) and the stable part of interim text.

``TurnDetector`` reads Silero's speech probabilities as they arrive (``vad.StreamingVad``) and
says when a turn starts, pauses, resumes and stops. ``StableText`` turns a growing turn's
successive decodes into deltas that never need retracting (LocalAgreement-2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from openstt.audio import SAMPLE_RATE
from openstt.live.protocol import TurnDetection
from openstt.vad import VAD_FRAME

# Silero's hysteresis: in speech, a frame counts as silence only below threshold - 0.15.
EXIT_MARGIN = 0.15


@dataclass(frozen=True)
class VadEvent:
    """``started``: a turn begins, its audio at ``sample`` (the onset less the prefix padding);
    ``paused``: silence began at ``sample`` (the turn may be over); ``resumed``: speech again before
    the silence lasted long enough; ``stopped``: the turn ended, its speech at ``sample``.
    Samples count 16 kHz samples since the session began."""

    kind: Literal["started", "paused", "resumed", "stopped"]
    sample: int


class TurnDetector:
    """``server_vad`` over streaming probabilities. A turn longer than ``max_turn_seconds`` is cut
    (stopped and started again at the same sample), so no decode is ever longer than one window."""

    def __init__(self, options: TurnDetection, max_turn_seconds: float = 30.0):
        self.threshold = options.threshold
        self.exit_threshold = max(options.threshold - EXIT_MARGIN, 0.01)
        self.pad = int(options.prefix_padding_ms * SAMPLE_RATE / 1000)
        self.silence = int(options.silence_duration_ms * SAMPLE_RATE / 1000)
        self.max_turn = int(max_turn_seconds * SAMPLE_RATE)
        self.in_speech = False
        self.turn_start = 0  # where the current turn's audio begins
        self.onset = 0  # where its speech begins (the first frame at or above the threshold)
        self.silence_start: int | None = None

    def reset(self) -> None:
        """Forget the current turn (the buffer was committed or cleared)."""
        self.in_speech, self.silence_start = False, None

    def push(self, probabilities: np.ndarray, first_frame: int) -> list[VadEvent]:
        """The events that the frames ``first_frame, first_frame + 1, ...`` bring."""
        events: list[VadEvent] = []
        for i, p in enumerate(np.asarray(probabilities, dtype=np.float64).tolist()):
            sample = (first_frame + i) * VAD_FRAME
            end = sample + VAD_FRAME
            if not self.in_speech:
                if p >= self.threshold:
                    self.in_speech, self.silence_start = True, None
                    self.turn_start, self.onset = max(0, sample - self.pad), sample
                    events.append(VadEvent("started", self.turn_start))
                continue
            if p >= self.threshold:
                if self.silence_start is not None:
                    self.silence_start = None
                    events.append(VadEvent("resumed", sample))
            elif p < self.exit_threshold and self.silence_start is None:
                self.silence_start = sample
                events.append(VadEvent("paused", sample))
            if self.silence_start is not None and end - self.silence_start >= self.silence:
                events.append(VadEvent("stopped", self.silence_start))
                self.reset()
            elif end - self.turn_start >= self.max_turn:
                events += [VadEvent("stopped", end), VadEvent("started", end)]
                self.turn_start, self.onset, self.silence_start = end, end, None
        return events


def _norm(word: str) -> str:
    return re.sub(r"[^\w']", "", word.lower())


class StableText:
    """LocalAgreement-2: a word is final once two consecutive decodes of the growing turn agree
    on it and on every word before it. (A word cut off at the end of the audio is not agreed on:
    the next decode has more of it.) Deltas are the newly stable words, so their concatenation
    only grows."""

    def __init__(self):
        self._previous: list[str] = []
        self.words: list[str] = []  # emitted so far

    @property
    def text(self) -> str:
        return " ".join(self.words)

    def _delta(self, words: list[str]) -> str:
        if not words:
            return ""
        self.words += words
        return (" " if len(self.words) > len(words) else "") + " ".join(words)

    def update(self, hypothesis: str) -> str:
        """The delta that the decode ``hypothesis`` of the turn so far makes stable ("" if none)."""
        current = hypothesis.split()
        agreed = 0
        for a, b in zip(self._previous, current):
            if _norm(a) != _norm(b):
                break
            agreed += 1
        self._previous = current
        if agreed <= len(self.words):
            return ""
        # what was emitted must still be this decode's beginning
        if [_norm(w) for w in current[:len(self.words)]] != [_norm(w) for w in self.words]:
            return ""
        return self._delta(current[len(self.words):agreed])

    def finish(self, final: str) -> str:
        """The rest of the turn's final text, when it continues what was emitted ("" if it does not:
        deltas are never retracted, and the completed event carries the final text)."""
        current = final.split()
        if [_norm(w) for w in current[:len(self.words)]] != [_norm(w) for w in self.words]:
            return ""
        return self._delta(current[len(self.words):])
