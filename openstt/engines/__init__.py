"""Model families behind one interface; ``load_engine`` picks the right one for a catalog entry."""

from __future__ import annotations

from pathlib import Path

import torch

from openstt.catalog import ModelSpec
from openstt.device import Placement
from openstt.engines.base import Engine, TranscribeOptions, Transcript, UnsupportedRequest

# Families with an engine in this version; catalog entries of other families are refused at startup.
FAMILIES = frozenset({"whisper"})

__all__ = ["FAMILIES", "Engine", "TranscribeOptions", "Transcript", "UnsupportedRequest", "load_engine"]


def load_engine(spec: ModelSpec, path: Path, device: torch.device | Placement, dtype: torch.dtype | None = None
                ) -> Engine:
    """Load the weights at ``path`` with the engine of ``spec.family``."""
    placement = device if isinstance(device, Placement) else Placement(device, dtype or torch.float32)
    if spec.family == "whisper":
        from openstt.engines.whisper import WhisperEngine

        return WhisperEngine(spec, path, placement)
    raise NotImplementedError(
        f"Model '{spec.name}' belongs to the '{spec.family}' family, which this version cannot serve yet."
    )
