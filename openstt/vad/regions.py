"""Speech probabilities -> padded speech regions (Silero's hysteresis rules) -> chunks of at most
30 s of speech cut only at silences, each mapping its own timeline back to the file's."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from openstt.audio import SAMPLE_RATE
from openstt.vad.options import VadOptions
from openstt.vad.silero import VAD_FRAME, speech_probabilities


def speech_regions(audio: np.ndarray | None, options: VadOptions | None = None, *,
                   probabilities: np.ndarray | None = None, total_samples: int | None = None
                   ) -> list[tuple[int, int]]:
    """Sample ranges ``(start, end)`` of speech in ``audio``, padded, in order, non-overlapping
    (padded neighbours may touch).

    Silero's ``get_speech_timestamps`` rules, without its maximum length (``plan_chunks`` splits long
    regions). Pass ``probabilities`` (from ``speech_probabilities``) and ``total_samples`` instead of
    ``audio`` to reuse them."""
    options = options or VadOptions()
    if probabilities is None:
        if audio is None:
            raise ValueError("pass audio or probabilities")
        probabilities = speech_probabilities(audio)
    if total_samples is None:
        total_samples = len(audio) if audio is not None else len(probabilities) * VAD_FRAME
    threshold, exit_threshold = options.threshold, options.exit_threshold
    min_speech = SAMPLE_RATE * options.min_speech_ms / 1000
    min_silence = SAMPLE_RATE * options.min_silence_ms / 1000
    pad = int(SAMPLE_RATE * options.speech_pad_ms / 1000)

    speeches: list[list[int]] = []
    triggered, start, silence_start = False, 0, None
    for i, p in enumerate(np.asarray(probabilities, dtype=np.float64).tolist()):
        sample = i * VAD_FRAME
        if p >= threshold:
            silence_start = None  # the pause was too short: still the same region
            if not triggered:
                triggered, start = True, sample
            continue
        if triggered and p < exit_threshold:
            if silence_start is None:
                silence_start = sample
            if sample - silence_start >= min_silence:
                if silence_start - start > min_speech:
                    speeches.append([start, silence_start])
                triggered, silence_start = False, None
    if triggered and total_samples - start > min_speech:
        speeches.append([start, total_samples])

    # Padding, Silero's way: a gap shorter than two pads is shared half and half.
    for i, speech in enumerate(speeches):
        if i == 0:
            speech[0] = max(0, speech[0] - pad)
        if i + 1 < len(speeches):
            following = speeches[i + 1]
            gap = following[0] - speech[1]
            if gap < 2 * pad:
                speech[1] += gap // 2
                following[0] = max(0, following[0] - gap // 2)
            else:
                speech[1] = min(total_samples, speech[1] + pad)
                following[0] = max(0, following[0] - pad)
        else:
            speech[1] = min(total_samples, speech[1] + pad)
    return [(int(s), int(e)) for s, e in speeches]


# --- chunks ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    """Up to ``max_seconds`` of speech: the file's sample ``ranges`` (in order, with silence between
    them) that, concatenated, are the audio to decode. Times in that audio map back with
    ``to_file_seconds``."""

    ranges: tuple[tuple[int, int], ...]

    @property
    def start(self) -> int:
        return self.ranges[0][0]

    @property
    def end(self) -> int:
        return self.ranges[-1][1]

    @property
    def samples(self) -> int:
        """Length of the concatenated audio."""
        return sum(e - s for s, e in self.ranges)

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE

    def audio(self, audio: np.ndarray) -> np.ndarray:
        """This chunk's audio: its ranges of the file's ``audio``, concatenated."""
        if len(self.ranges) == 1:
            return audio[self.start:self.end]
        return np.concatenate([audio[s:e] for s, e in self.ranges])

    def to_file_seconds(self, seconds: float, *, is_end: bool = False) -> float:
        """A time in the chunk's audio (e.g. a Whisper timestamp) -> the same moment in the file.

        Within a range the map is a shift, so it is exact; beyond the chunk's audio it is clamped to
        the chunk's ends. A time exactly where two ranges were joined is the end of the earlier
        range when ``is_end`` (a segment or word ending there), else the start of the later one."""
        offsets = self._offsets
        # rounded so that float noise (1.23 * 16000 = 19680.000000000004) cannot cross a join
        x = min(max(round(seconds * SAMPLE_RATE, 6), 0.0), offsets[-1])
        if is_end:
            i = max(bisect.bisect_left(offsets, x) - 1, 0)
        else:
            i = min(bisect.bisect_right(offsets, x) - 1, len(self.ranges) - 1)
        return (self.ranges[i][0] + x - offsets[i]) / SAMPLE_RATE

    @cached_property
    def _offsets(self) -> list[int]:
        """Where each range starts in the chunk's audio, and (last) the chunk's length."""
        offsets = [0]
        for s, e in self.ranges:
            offsets.append(offsets[-1] + e - s)
        return offsets


def plan_chunks(regions: Sequence[tuple[int, int]], total_samples: int, max_seconds: float = 30.0, *,
                probabilities: np.ndarray | None = None, search_seconds: float = 5.0) -> list[Chunk]:
    """Speech ``regions`` (from ``speech_regions``) grouped, in order, into chunks of at most
    ``max_seconds`` of speech each; the silence between regions is left out of a chunk's audio.

    Chunks are cut only between regions. A region longer than ``max_seconds`` is split into pieces
    that follow each other without a gap, each cut in the middle of the least speech-like 96 ms (by
    ``probabilities``, when given) of the last ``search_seconds`` before the limit, else at the limit.
    Every sample of every region is in exactly one chunk."""
    limit = int(max_seconds * SAMPLE_RATE)
    if limit < VAD_FRAME:
        raise ValueError("max_seconds must be at least 32 ms")
    smoothed = None
    if probabilities is not None and len(probabilities):
        # three frames averaged, so one dip inside a word does not count as a pause
        smoothed = np.convolve(np.pad(np.asarray(probabilities, np.float64), 1, mode="edge"), np.ones(3) / 3,
                               mode="valid")
    pieces: list[tuple[int, int]] = []
    previous_end = 0
    for s, e in regions:
        s, e = max(int(s), 0), min(int(e), total_samples)
        if s < previous_end:
            raise ValueError("regions must be in order and must not overlap")
        if e > s:
            pieces.extend(_split(s, e, limit, smoothed, int(search_seconds * SAMPLE_RATE)))
            previous_end = e

    chunks: list[Chunk] = []
    ranges: list[tuple[int, int]] = []
    length = 0
    for s, e in pieces:
        if ranges and length + e - s > limit:
            chunks.append(Chunk(tuple(ranges)))
            ranges, length = [], 0
        if ranges and ranges[-1][1] == s:  # touching (padded) regions: one range, one join less to map
            ranges[-1] = (ranges[-1][0], e)
        else:
            ranges.append((s, e))
        length += e - s
    if ranges:
        chunks.append(Chunk(tuple(ranges)))
    return chunks


def _split(start: int, end: int, limit: int, smoothed: np.ndarray | None, search: int) -> list[tuple[int, int]]:
    """``[start, end)`` as contiguous pieces of at most ``limit`` samples, cut where speech is least likely."""
    pieces = []
    search = min(search, limit // 2)
    while end - start > limit:
        cut = start + limit
        if smoothed is not None:
            # frames whose middle lies in the search window; ties (digital silence) go to the latest
            first = max(-(-(cut - search - VAD_FRAME // 2) // VAD_FRAME), 0)
            last = min((cut - VAD_FRAME // 2) // VAD_FRAME, len(smoothed) - 1)
            if last >= first:
                window = smoothed[first:last + 1]
                best = first + len(window) - 1 - int(np.argmin(window[::-1]))
                cut = min(max(best * VAD_FRAME + VAD_FRAME // 2, start + 1), start + limit)
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def speech_chunks(audio: np.ndarray, options: VadOptions | None = None, max_seconds: float = 30.0, *,
                  probabilities: np.ndarray | None = None) -> list[Chunk]:
    """The speech of ``audio`` as chunks of at most ``max_seconds``: probabilities (unless given,
    e.g. shared with diarization), regions, plan. No speech: no chunks."""
    if probabilities is None:
        probabilities = speech_probabilities(audio)
    regions = speech_regions(audio, options, probabilities=probabilities)
    return plan_chunks(regions, len(audio), max_seconds, probabilities=probabilities)
