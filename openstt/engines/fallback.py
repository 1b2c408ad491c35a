"""When a window's decode is not kept as it is: the decisions shared by Whisper and Voxtral.

A window of silence is not decoded at all; a result that looks like a loop or is unlikely is
decoded again hotter (the temperature ladder of ``TranscribeOptions.temperatures``), and of a
window's attempts ``settle`` picks the one to keep.
"""

from __future__ import annotations

import zlib

import numpy as np

from openstt.messages import DecodeResult, WindowJob


# A window whose loudest sample is below -60 dBFS holds no speech. Whisper, fed digital silence,
# often says "you" or "Thank you." with confidence; such windows are not decoded at all.
SILENCE_PEAK = 10 ** (-60 / 20)


def is_silent(chunk: np.ndarray) -> bool:
    return not len(chunk) or float(np.abs(chunk).max()) < SILENCE_PEAK


def looks_like_loop(result: DecodeResult, job: WindowJob) -> bool:
    """Too repetitive to be speech: compresses better than the threshold (and, for a speech-only
    window, also ran to the token limit)."""
    return (job.compression_ratio_threshold is not None
            and result.compression_ratio > job.compression_ratio_threshold
            and (result.truncated or not job.speech_only))


def needs_fallback(result: DecodeResult, job: WindowJob) -> bool:
    """Whether ``result`` should be decoded again hotter: it looks like a loop or is unlikely, and
    is not a window of silence (a silent window's low logprob is expected)."""
    if result.error:
        return False
    too_repetitive = looks_like_loop(result, job)
    too_unlikely = job.logprob_threshold is not None and result.avg_logprob < job.logprob_threshold
    silent = (job.no_speech_threshold is not None and result.no_speech_prob > job.no_speech_threshold
              and too_unlikely)
    return (too_repetitive or too_unlikely) and not silent


def settle(attempts: list[DecodeResult], job: WindowJob) -> DecodeResult:
    """The result to keep from a window's attempts: the last one, unless every attempt needed a
    fallback; then, as faster-whisper does, the likeliest (highest average logprob) among those
    that do not look like a loop, else among all. openai/whisper keeps the last, temperature-1.0
    sample, which on hard audio is often mixed-script garbage."""
    if not needs_fallback(attempts[-1], job) or len(attempts) == 1:
        return attempts[-1]
    unlooped = [r for r in attempts if not looks_like_loop(r, job)]
    return max(unlooped or attempts, key=lambda r: r.avg_logprob)


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0
