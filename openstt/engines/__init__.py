"""Model families behind one interface, and where engines are built: ``load_engine`` picks the
family of a catalog entry; ``load_weights`` (the model service) finds the weights and loads them;
``remote_engine`` (the API process) builds the weightless side that sends windows to the model
service. A new family only has to be added here."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from openstt.catalog import ModelSpec
from openstt.device import Placement, tune_backends
from openstt.engines.base import Engine, TranscribeOptions, UnsupportedRequest
from openstt.transcript import Transcript

if TYPE_CHECKING:
    from openstt.messages import ModelService

log = logging.getLogger("openstt.registry")  # the name its startup lines have always had

__all__ = ["Engine", "TranscribeOptions", "Transcript", "UnsupportedRequest", "load_engine",
           "load_frontend", "load_weights", "remote_engine"]


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


def load_weights(spec: ModelSpec, placement: Placement, *, download: bool,
                 chunk_seconds: float | None = None, batch_windows: int | None = None) -> Engine:
    """Model service: find ``spec`` in the HF cache (downloading if allowed) and load its weights;
    a static decoder (``placement.decoder``) is warmed for batches of ``batch_windows`` rows."""
    from openstt.hub import resolve_model
    from openstt.metrics import metrics

    path = resolve_model(spec, download=download)
    engine = load_engine(spec, path, placement, chunk_seconds=chunk_seconds)
    metrics().model_load_seconds.labels(spec.name).set(getattr(engine, "load_seconds", 0.0))
    log.info("loaded %s from %s on %s (%s, %s attention, quantize=%s, %d threads) in %.1f s", spec.name, path,
             placement.device, placement.dtype, placement.attn_implementation, placement.quantize,
             torch.get_num_threads(), getattr(engine, "load_seconds", 0.0))
    warm = getattr(getattr(engine, "core", None), "warm", None)
    if placement.decoder != "eager" and batch_windows and warm is not None:
        log.info("model %s: %s", spec.name, warm(batch_windows))
    return engine


def remote_engine(spec: ModelSpec, models: ModelService, *, chunk_seconds: float | None = None,
                  max_batch_windows: int) -> Engine:
    """API process: the request side of a model whose weights live in the model service
    (``models``): its tokenizer and transcription loop, from the cached snapshot."""
    from openstt.engines.remote import RemoteEngine
    from openstt.hub import resolve_model

    path = resolve_model(spec, download=False)
    return RemoteEngine(spec, load_frontend(spec, path, chunk_seconds=chunk_seconds), models,
                        max_batch_windows=max_batch_windows)


def _no_engine(spec: ModelSpec) -> NotImplementedError:
    return NotImplementedError(
        f"Model '{spec.name}' belongs to the '{spec.family}' family, which this version cannot serve yet."
    )
