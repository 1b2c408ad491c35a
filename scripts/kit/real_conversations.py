"""Real recorded conversations with speaker labels (tests/data/conversations, see its README)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "conversations"
TWO_SPEAKERS = ("sample", "dev00", "dev01", "trn03")  # the real two-person conversations


@dataclass(frozen=True)
class RealTurn:
    speaker: str
    start: float
    end: float


@dataclass
class RealConversation:
    name: str
    audio: np.ndarray  # float32, 16 kHz mono
    turns: list[RealTurn]  # the truth; overlapping turns are speech of two people at once

    @property
    def speakers(self) -> set[str]:
        return {t.speaker for t in self.turns}

    @property
    def seconds(self) -> float:
        return len(self.audio) / 16000


def load(name: str) -> RealConversation:
    import soundfile as sf

    audio, rate = sf.read(DATA / f"{name}.flac", dtype="float32")
    assert rate == 16000 and audio.ndim == 1, (name, rate, audio.shape)
    turns = []
    for line in (DATA / f"{name}.rttm").read_text().splitlines():
        fields = line.split()
        start, duration = float(fields[3]), float(fields[4])
        turns.append(RealTurn(fields[7], start, start + duration))
    return RealConversation(name, audio, sorted(turns, key=lambda t: t.start))


def names(*, two_speakers: bool | None = None) -> list[str]:
    """Every recording (sorted), or only the two-person ones (True), or only the others (False)."""
    every = sorted(p.stem for p in DATA.glob("*.flac"))
    if two_speakers is None:
        return every
    return [n for n in every if (n in TWO_SPEAKERS) == two_speakers]
