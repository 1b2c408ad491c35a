"""Cutting long audio into chunks at quiet moments, for models that take one chunk per pass.

Whisper finds its own cut points (it seeks to its last timestamp); models without timestamps
(Voxtral) get fixed-size chunks instead, each ending at the quietest moment near the limit so
that a word is rarely split between two chunks. Chunk boundaries become segment times.
"""

from __future__ import annotations

import numpy as np

from openstt.audio import HOP, SAMPLE_RATE

SMOOTH = 10  # 10 ms energy frames averaged (100 ms) so one quiet sample inside a word does not count as a pause


def quiet_cuts(audio: np.ndarray, max_seconds: float, search_seconds: float = 5.0) -> list[tuple[int, int]]:
    """Sample ranges ``(start, end)`` covering ``audio``, each at most ``max_seconds`` long.

    Each cut falls at the quietest 100 ms within the last ``search_seconds`` before the limit.
    """
    n = len(audio)
    limit = int(max_seconds * SAMPLE_RATE)
    if limit <= 0:
        raise ValueError("max_seconds must be positive")
    search = min(int(search_seconds * SAMPLE_RATE), limit // 2)
    chunks: list[tuple[int, int]] = []
    start = 0
    while n - start > limit:
        cut = start + limit - search + _quietest(audio[start + limit - search : start + limit])
        chunks.append((start, cut))
        start = cut
    if start < n:
        chunks.append((start, n))
    return chunks


def _quietest(window: np.ndarray) -> int:
    """Offset (in samples) of the middle of the quietest 100 ms in ``window``."""
    frames = len(window) // HOP
    if frames <= SMOOTH:
        return len(window)
    energy = np.square(window[: frames * HOP].astype(np.float64)).reshape(frames, HOP).mean(axis=1)
    smoothed = np.convolve(energy, np.ones(SMOOTH) / SMOOTH, mode="valid")
    # ties (e.g. digital silence) go to the latest frame: the longest chunk
    best = len(smoothed) - 1 - int(np.argmin(smoothed[::-1]))
    return (best + SMOOTH // 2) * HOP
