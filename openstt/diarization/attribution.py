"""Giving each transcribed segment (and word) its speaker, from the diarization's turns.

The turns come from 1.5 s spans of speech, so their boundaries are only that precise; the words
know where the pauses are. A word first goes to the speaker whose turns cover most of it (the
nearest turn when none does). Then the words are read as phrases (ended by . ? ! or a pause of
``PHRASE_GAP``), and within a phrase a run of one speaker's words shorter than ``MIN_RUN_SECONDS``
joins its neighbours: so a change of speaker falls between words, and never splits a short
phrase or a run of words that one person says without pausing. Where two people speak at once,
each word goes to the voice that the turns give most of it, and an overlap yields no turn of its own.
A segment with word timings is then split where its words change speaker, so one segment never
holds two voices; a segment without word timings goes whole to the speaker covering most of it.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Protocol

PHRASE_END = tuple(".?!。？！")
PHRASE_GAP = 0.5  # seconds of pause that end a phrase (speaker changes in quick exchanges: 0.1-0.5 s)
# A speaker's run of words inside one phrase shorter than this is the diarization's imprecision
# (its spans are 1.5 s): on the real phone conversation, such runs were all misattributed.
MIN_RUN_SECONDS = 1.0


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


def word_speakers(words: Sequence, speakers: Speakers) -> list[str | None]:
    """The speaker of each word (``words`` in time order, across segments): first the speaker
    covering most of it, then, within each phrase, runs shorter than ``MIN_RUN_SECONDS`` merged into
    the neighbouring run that is longer."""
    labels = [speakers.at(w.start, w.end) for w in words]
    start = 0
    for i, word in enumerate(words):
        last = i == len(words) - 1
        if last or word.word.rstrip().endswith(PHRASE_END) or words[i + 1].start - word.end >= PHRASE_GAP:
            _smooth(words, labels, start, i + 1)
            start = i + 1
    return labels


def _smooth(words: Sequence, labels: list, lo: int, hi: int) -> None:
    """Within words[lo:hi] (one phrase), merge the shortest run of one label into its longer
    neighbour while it is shorter than ``MIN_RUN_SECONDS``."""
    while True:
        runs = []  # [first, end) index ranges of equal labels
        for i in range(lo, hi):
            if runs and labels[runs[-1][0]] == labels[i]:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
        if len(runs) < 2:
            return
        seconds = [words[e - 1].end - words[b].start for b, e in runs]
        k = min(range(len(runs)), key=seconds.__getitem__)
        if seconds[k] >= MIN_RUN_SECONDS:
            return
        neighbours = [j for j in (k - 1, k + 1) if 0 <= j < len(runs)]
        into = max(neighbours, key=seconds.__getitem__)
        labels[runs[k][0]:runs[k][1]] = [labels[runs[into][0]]] * (runs[k][1] - runs[k][0])


def split_by_speaker(segment, speakers: Speakers, labels: list | None = None) -> list:
    """``segment`` with its ``speaker`` set, or split into one segment per run of one speaker's
    words (each with those words, their text and span; the first keeps the tokens). ``labels``:
    its words' speakers (``word_speakers``), if known."""
    if not speakers:
        return [segment]
    if not segment.words:
        return [dataclasses.replace(segment, speaker=speakers.at(segment.start, segment.end))]
    if labels is None:
        labels = word_speakers(segment.words, speakers)
    runs: list[tuple[str | None, list]] = []
    for word, speaker in zip(segment.words, labels):
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
            segment, speaker=speaker, words=words, text=" " + " ".join(w.word.strip() for w in words),
            start=segment.start if first else words[0].start, end=segment.end if last else words[-1].end,
            tokens=segment.tokens if first else [], logprobs=segment.logprobs if first else []))
    return pieces


def attribute(segments: Iterable, speakers: Speakers, first_id: int = 0) -> list:
    """Every segment with its speaker, split at speaker changes, numbered from ``first_id``. The
    words of all the segments are read together, so a phrase may continue into the next segment."""
    segments = list(segments)
    labels = word_speakers([w for s in segments for w in s.words], speakers) if speakers else []
    out, at = [], 0
    for segment in segments:
        out += split_by_speaker(segment, speakers, labels[at:at + len(segment.words)])
        at += len(segment.words)
    return [dataclasses.replace(s, id=first_id + i) for i, s in enumerate(out)]
