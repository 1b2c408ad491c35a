"""Word and segment times held to where the VAD hears speech.

Whisper's cross-attention alignment puts a window's first word at the window's start when the
speech begins later: 7 s of room noise before "The quick brown fox" gave "The" 0.00-7.22 s, and a
segment 0.00-9.68 s (issue #26). So, for a request whose words are timed, each word's start and
end are moved out of the non-speech around it (into the first and last speech regions it
overlaps, padded by ``PAD_MS``), and each segment spans its words: from its first word's start to
its last word's end. Without word times (plain ``verbose_json``, srt, vtt), each segment is held
the same way. A word or segment that overlaps no speech region at all keeps its times (the VAD
may have missed a quiet word).
"""

from __future__ import annotations

import bisect

import numpy as np

from openstt.audio import SAMPLE_RATE
from openstt.transcript import Segment
from openstt.vad import VadOptions, speech_regions

PAD_MS = 200  # a boundary may sit this far into non-speech (onsets and tails the VAD scores low)
# every stretch of speech counts, however short ("mm-hm" is 0.3 s); pauses of 200 ms separate
REGIONS = VadOptions(min_silence_ms=200, speech_pad_ms=PAD_MS, min_speech_ms=0)


def speech_spans(probabilities: np.ndarray, samples: int) -> list[tuple[float, float]]:
    """The speech regions, in seconds, of audio of ``samples`` samples with these VAD probabilities."""
    regions = speech_regions(None, REGIONS, probabilities=probabilities, total_samples=samples)
    return [(start / SAMPLE_RATE, end / SAMPLE_RATE) for start, end in regions]


def hold_to_speech(segments: list[Segment], spans: list[tuple[float, float]]) -> list[Segment]:
    """``segments`` with their words' times moved out of non-speech and each segment spanning
    its words; a segment without words is itself held to the speech under it. Changes them in
    place; returns them."""
    if not spans:
        return segments
    starts = [s for s, _ in spans]
    for segment in segments:
        for item in segment.words or [segment]:
            # the regions it overlaps: from the last one starting before its end, back
            last = bisect.bisect_left(starts, item.end) - 1
            first = last
            while first >= 0 and spans[first][1] > item.start:
                first -= 1
            first += 1
            if first > last:  # no speech under it
                continue
            item.start = max(item.start, spans[first][0])
            item.end = max(min(item.end, spans[last][1]), item.start)
        if segment.words:
            segment.start, segment.end = segment.words[0].start, segment.words[-1].end
    return segments
