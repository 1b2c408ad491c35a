"""Choosing where models run and in which precision."""

from __future__ import annotations

import torch


def pick_device(force_cpu: bool = False) -> torch.device:
    """CUDA when present (unless forced to CPU), then Apple's MPS, then CPU."""
    if not force_cpu:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """Half precision on accelerators; float32 on CPU, where fp16 matmuls are slow or missing."""
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32
