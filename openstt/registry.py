"""The resident models of one worker, and how request model names map onto them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from openstt.catalog import CATALOG, OPENAI_ALIAS, lookup
from openstt.engines.base import Engine
from openstt.settings import Settings

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    def __init__(self, name: str, available: list[str]):
        super().__init__(name)
        self.name, self.available = name, available


@dataclass
class LoadedModel:
    engine: Engine
    created: int  # unix seconds when it was loaded, as /v1/models reports


class ModelRegistry:
    """Loaded engines by catalog name, plus the default used by the ``whisper-1`` alias."""

    def __init__(self, engines: list[Engine], default: str):
        self._models = {e.name: LoadedModel(e, int(time.time())) for e in engines}
        if default not in self._models:
            raise ValueError(f"default model {default!r} is not loaded")
        self.default = default

    @classmethod
    def load(cls, settings: Settings) -> ModelRegistry:
        """Resolve every configured model in the HF cache (downloading if allowed) and load it."""
        import torch

        from openstt.device import Placement
        from openstt.engines import load_engine
        from openstt.hub import resolve_model
        from openstt.metrics import metrics

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        placement = Placement.from_settings(settings)
        engines = []
        for name in settings.models:
            spec = CATALOG[name]
            path = resolve_model(spec, download=settings.download)
            engine = load_engine(spec, path, placement, chunk_seconds=settings.voxtral_chunk_seconds)
            metrics().model_load_seconds.labels(name).set(getattr(engine, "load_seconds", 0.0))
            log.info("loaded %s from %s on %s (%s, %s attention, quantize=%s, %d threads) in %.1f s", name, path,
                     placement.device, placement.dtype, placement.attn_implementation, placement.quantize,
                     torch.get_num_threads(), getattr(engine, "load_seconds", 0.0))
            engines.append(engine)
        return cls(engines, settings.default_model or settings.models[0])

    @classmethod
    def load_frontends(cls, settings: Settings, decode, align) -> ModelRegistry:
        """The API side when a model service holds the weights: tokenizers only, windows sent
        to ``decode``/``align`` (the batching model service)."""
        from openstt.batching import BatchedEngine
        from openstt.engines import load_frontend
        from openstt.hub import resolve_model

        engines = []
        for name in settings.models:
            spec = CATALOG[name]
            frontend = load_frontend(spec, resolve_model(spec, download=False),
                                     chunk_seconds=settings.voxtral_chunk_seconds)
            engines.append(BatchedEngine(spec, frontend, decode, align))
        return cls(engines, settings.default_model or settings.models[0])

    def engines(self) -> dict[str, Engine]:
        return {name: m.engine for name, m in self._models.items()}

    def names(self) -> list[str]:
        return list(self._models)

    def created(self, name: str) -> int:
        return self._models[name].created

    def resolve(self, requested: str) -> str:
        """Map a requested id (catalog name, HF repo id or ``whisper-1``) to a loaded model name."""
        if requested == OPENAI_ALIAS:
            return "whisper-tiny" if "whisper-tiny" in self._models else self.default
        spec = lookup(requested)
        if spec is None or spec.name not in self._models:
            raise UnknownModel(requested, self.names())
        return spec.name

    def get(self, requested: str) -> Engine:
        return self._models[self.resolve(requested)].engine
