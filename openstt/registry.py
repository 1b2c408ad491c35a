"""The resident models of one process, and how request model names map onto them.

The registry only stores engines and resolves names; engines are built by ``openstt.engines``
(``load_weights`` in the model service, ``remote_engine`` in the API process), at startup
(``openstt.bootstrap``) and when a model is loaded at runtime (``POST /v1/models/{id}``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from openstt.catalog import OPENAI_ALIAS, OPENAI_MODEL_IDS, lookup
from openstt.errors import DefaultModelPinned, ModelNotFound

if TYPE_CHECKING:
    from openstt.engines.base import Engine

log = logging.getLogger(__name__)


UnknownModel = ModelNotFound  # the name this module used to raise


@dataclass
class LoadedModel:
    engine: Engine
    created: int  # unix seconds when it was loaded, as /v1/models reports
    # Usage, for idle unloading and for draining before an unload (API process).
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0


class Lease:
    """One request's use of a model: keeps it from being idle-unloaded until released."""

    def __init__(self, registry: ModelRegistry, name: str, entry: LoadedModel):
        self.name, self.engine, self._registry, self._entry = name, entry.engine, registry, entry
        self._released = False

    def release(self) -> None:
        with self._registry._lock:
            if self._released:
                return
            self._released = True
            self._entry.in_flight -= 1
            self._entry.last_used = time.monotonic()


class ModelRegistry:
    """Loaded engines by catalog name, the default model (for requests without a model and for
    OpenAI's ids), and the configured aliases (``OPEN_STT_MODEL_ALIASES``: alias -> catalog name).

    Models may be added and removed at runtime; every access holds a lock, so the model
    service's decoding threads and its load/unload threads see a consistent set."""

    def __init__(self, engines: list[Engine], default: str, aliases: dict[str, str] | None = None):
        self._lock = threading.RLock()
        self._models = {e.name: LoadedModel(e, int(time.time())) for e in engines}
        if default not in self._models:
            raise ValueError(f"default model {default!r} is not loaded")
        self.default = default
        self.aliases = dict(aliases or {})

    # --- the current set ---------------------------------------------------------------------

    def engines(self) -> dict[str, Engine]:
        with self._lock:
            return {name: m.engine for name, m in self._models.items()}

    def engine(self, name: str) -> Engine | None:
        """The engine loaded under catalog name ``name``, or None."""
        with self._lock:
            entry = self._models.get(name)
            return entry.engine if entry else None

    def names(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._models

    def created(self, name: str) -> int:
        with self._lock:
            return self._models[name].created

    def add(self, engine: Engine) -> LoadedModel:
        """Make ``engine`` servable (a model loaded at runtime); refuses a name already loaded."""
        with self._lock:
            if engine.name in self._models:
                raise ValueError(f"model {engine.name!r} is already loaded")
            entry = self._models[engine.name] = LoadedModel(engine, int(time.time()))
            return entry

    def remove(self, name: str) -> LoadedModel | None:
        """Stop serving ``name``; returns its entry (None if it was not loaded). The default
        model cannot be removed (``DefaultModelPinned``): ``whisper-1`` and default requests rely on it."""
        with self._lock:
            if name == self.default:
                raise DefaultModelPinned(name)
            return self._models.pop(name, None)

    # --- requests ----------------------------------------------------------------------------

    def alias_target(self, requested: str) -> str | None:
        """The model an alias names (configured, ``whisper-1`` or another OpenAI id), else None."""
        with self._lock:
            if requested in self.aliases:
                return self.aliases[requested]
            if requested == OPENAI_ALIAS:
                return "whisper-tiny" if "whisper-tiny" in self._models else self.default
            if requested in OPENAI_MODEL_IDS:
                return self.default
            return None

    def resolve(self, requested: str | None) -> str:
        """Map a requested id (catalog name, HF repo id or alias; None: the default model) to a
        loaded model name; ``ModelNotFound`` when none is loaded under it."""
        with self._lock:
            if not requested:
                return self.default
            target = self.alias_target(requested)
            if target is not None:
                if target not in self._models:  # a configured alias whose model was unloaded
                    raise ModelNotFound(requested, self.names(), alias_of=target)
                return target
            spec = lookup(requested)
            if spec is None or spec.name not in self._models:
                raise ModelNotFound(requested, self.names())
            return spec.name

    def get(self, requested: str) -> Engine:
        with self._lock:
            return self._models[self.resolve(requested)].engine

    def acquire(self, requested: str | None) -> Lease:
        """Resolve ``requested`` and mark its model in use until the lease is released."""
        with self._lock:
            name = self.resolve(requested)
            entry = self._models[name]
            entry.in_flight += 1
            entry.last_used = time.monotonic()
            return Lease(self, name, entry)

    def touch_all(self) -> None:
        """Count now as every model's last use (the idle TTL starts when the models can serve)."""
        now = time.monotonic()
        with self._lock:
            for entry in self._models.values():
                entry.last_used = now

    def in_flight(self, entry: LoadedModel) -> int:
        with self._lock:
            return entry.in_flight

    def idle(self, ttl: float, now: float | None = None) -> list[str]:
        """Models (never the default) with no request in flight and none started for ``ttl`` s."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return [name for name, m in self._models.items()
                    if name != self.default and m.in_flight == 0 and now - m.last_used >= ttl]
