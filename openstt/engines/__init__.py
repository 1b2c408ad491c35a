"""Model families behind one interface; ``load_engine`` picks the right one for a catalog entry."""

from __future__ import annotations

from pathlib import Path

import torch

from openstt.catalog import ModelSpec
from openstt.device import Placement, tune_backends
from openstt.engines.base import Engine, TranscribeOptions, UnsupportedRequest
from openstt.transcript import Transcript

__all__ = ["Engine", "TranscribeOptions", "Transcript", "UnsupportedRequest", "load_engine",
           "load_frontend"]


def load_engine(spec: ModelSpec, path: Path, device: torch.device | Placement, dtype: torch.dtype | None = None,
                *, chunk_seconds: float | None = None) -> Engine:
    """Load the weights at ``path`` with the engine of ``spec.family`` (``chunk_seconds``: Voxtral's
    chunk length; Whisper always reads 30 s windows)."""
    placement = device if isinstance(device, Placement) else Placement(device, dtype or torch.float32)
    tune_backends(placement.device)
    if spec.family == "whisper":
        from openstt.engines.whisper import WhisperEngine

        return WhisperEngine(spec, path, placement)
    if spec.family == "voxtral":
        from openstt.engines.voxtral import DEFAULT_CHUNK_SECONDS, VoxtralEngine

        return VoxtralEngine(spec, path, placement, chunk_seconds or DEFAULT_CHUNK_SECONDS)
    raise _no_engine(spec)


def load_frontend(spec: ModelSpec, path: Path, *, chunk_seconds: float | None = None):
    """The weightless request side of ``spec`` (tokenizer + transcription loop), for the API
    process when a model service holds the weights. Has ``loop``, ``check``, ``new_state``,
    ``multilingual`` and ``supports_word_timestamps``."""
    if spec.family == "whisper":
        from openstt.engines.whisper import WhisperFrontend

        return WhisperFrontend(spec, path)
    if spec.family == "voxtral":
        from openstt.engines.voxtral import DEFAULT_CHUNK_SECONDS, VoxtralFrontend

        return VoxtralFrontend(spec, path, chunk_seconds or DEFAULT_CHUNK_SECONDS)
    raise _no_engine(spec)


def _no_engine(spec: ModelSpec) -> NotImplementedError:
    return NotImplementedError(
        f"Model '{spec.name}' belongs to the '{spec.family}' family, which this version cannot serve yet."
    )
