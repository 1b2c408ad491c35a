"""Giving each transcribed segment (and word) its speaker, from the diarization's turns.

A word goes to the speaker whose turns cover most of it (the nearest turn when none does: words
at a turn's edge are often timed a little outside it). A segment with word timings is split where
its words change speaker, so one segment never holds two voices; a segment without word timings
(a model that has none) goes whole to the speaker covering most of it.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Protocol


class TurnLike(Protocol):
    start: float
    end: float
    speaker: str


class Speakers:
    """Lookups of who spoke over a time span, for turns in time order."""

    def __init__(self, turns: Sequence[TurnLike]):
        self.turns = list(turns)
        self._ends = [t.end for t in self.turns]

    def __bool__(self) -> bool:
        return bool(self.turns)

    def at(self, start: float, end: float) -> str | None:
        """The speaker covering most of ``[start, end]``; the nearest turn's if none overlaps it;
        None without turns."""
        if not self.turns:
            return None
        covered: dict[str, float] = {}
        i = bisect.bisect_right(self._ends, start)  # the first turn ending after start
        for turn in self.turns[i:]:
            if turn.start >= end:
                break
            covered[turn.speaker] = covered.get(turn.speaker, 0.0) + min(end, turn.end) - max(start, turn.start)
        if covered:
            return max(covered, key=covered.get)
        middle = (start + end) / 2
        nearest = min(self.turns[max(i - 1, 0):i + 1],
                      key=lambda t: max(t.start - middle, middle - t.end, 0.0))
        return nearest.speaker


def split_by_speaker(segment, speakers: Speakers) -> list:
    """``segment`` with its ``speaker`` set, or split into one segment per run of one speaker's
    words (each with those words, their text and span; the first keeps the tokens)."""
    if not speakers:
        return [segment]
    if not segment.words:
        return [dataclasses.replace(segment, speaker=speakers.at(segment.start, segment.end))]
    runs: list[tuple[str | None, list]] = []
    for word in segment.words:
        speaker = speakers.at(word.start, word.end)
        word = dataclasses.replace(word, speaker=speaker)
        if runs and runs[-1][0] == speaker:
            runs[-1][1].append(word)
        else:
            runs.append((speaker, [word]))
    if len(runs) == 1:
        return [dataclasses.replace(segment, speaker=runs[0][0], words=runs[0][1])]
    pieces = []
    for n, (speaker, words) in enumerate(runs):
        first, last = n == 0, n == len(runs) - 1
        pieces.append(dataclasses.replace(
            segment, speaker=speaker, words=words, text=" " + " ".join(w.word for w in words),
            start=segment.start if first else words[0].start, end=segment.end if last else words[-1].end,
            tokens=segment.tokens if first else [], logprobs=segment.logprobs if first else []))
    return pieces


def attribute(segments: Iterable, speakers: Speakers, first_id: int = 0) -> list:
    """Every segment with its speaker, split at speaker changes, numbered from ``first_id``."""
    out = [piece for segment in segments for piece in split_by_speaker(segment, speakers)]
    return [dataclasses.replace(s, id=first_id + i) for i, s in enumerate(out)]
