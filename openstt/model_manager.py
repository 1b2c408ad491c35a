"""Loading and unloading models at runtime, and unloading idle ones: the API process's side
(the model service's is ``openstt.serving.WeightsManager``).

``POST /v1/models/{id}`` and ``DELETE /v1/models/{id}`` (with OPEN_STT_ENABLE_MODEL_MANAGEMENT) and
the idle TTL (OPEN_STT_MODEL_IDLE_TTL) all go through ``ModelManager`` in the API process:

- load: the model service loads the weights (``serving.WeightsManager.load``, downloading only with
  OPEN_STT_DOWNLOAD), then the API process builds the model's tokenizer-side frontend; only then
  is the model listed and servable. Loads run one at a time, each after its own memory check.
- unload: the model leaves the API registry first (new requests get ``ModelNotFound``),
  requests already in flight on it may finish (up to ``drain_timeout``), then the model service
  drops the weights. A request still running after that gets a clean 404 (the model service
  answers its windows with ``model_not_loaded``).
- idle TTL: an asyncio task here, in the API process, because that is where requests start and
  end: a request start counts as use, and a model with requests in flight is never idle (the model
  service only sees 30-second windows, with gaps between them). The default model is never
  unloaded, so ``whisper-1`` and default requests keep working.

Failures are raised as ``openstt.errors`` exceptions (``ModelNotFound``, ``ModelLoadFailed``, ...);
the API maps them to responses (``openstt.api.errors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable

from openstt.catalog import CATALOG, ModelSpec, lookup
from openstt.engines.base import Engine
from openstt.errors import (
    DefaultModelPinned,
    ModelIsAlias,
    ModelLoadFailed,
    ModelManagementDisabled,
    ModelNotFound,
)
from openstt.model_client import ModelServiceClient
from openstt.registry import ModelRegistry

log = logging.getLogger("openstt.models")


class ModelManager:
    """API process side: runtime load/unload through both processes, and the idle TTL."""

    def __init__(self, registry: ModelRegistry, *, models: ModelServiceClient, engine: Callable[[ModelSpec], Engine],
                 enabled: bool = False, idle_ttl: float = 0.0, drain_timeout: float = 30.0):
        """``models`` loads and unloads the weights in the model service; ``engine`` builds a
        model's API-side engine (blocking; it runs in a thread)."""
        self.registry, self.models, self._engine = registry, models, engine
        self.enabled, self.idle_ttl, self.drain_timeout = enabled, idle_ttl, drain_timeout
        self._locks: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task | None = None

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _spec(self, model_id: str) -> ModelSpec:
        target = self.registry.alias_target(model_id)
        if target is not None:
            raise ModelIsAlias(model_id, target)
        spec = lookup(model_id)
        if spec is None:
            raise ModelNotFound(model_id, self.registry.names(), loadable=list(CATALOG))
        return spec

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise ModelManagementDisabled()
        self.models.check_manageable()  # before anything changes here

    # --- load ------------------------------------------------------------------------------

    async def load(self, model_id: str) -> str:
        """Load ``model_id`` (catalog name or HF repo id) in both processes; returns its name.
        Already loaded: nothing to do."""
        self._check_enabled()
        spec = self._spec(model_id)
        if spec.name in self.registry:
            return spec.name
        async with self._lock(spec.name):
            if spec.name in self.registry:  # loaded while we waited for the lock
                return spec.name
            started = time.perf_counter()
            reply = await self.models.load(spec.name)
            if reply.error is not None:
                raise ModelLoadFailed(spec.name, reply.error, reply.message)
            try:
                engine = await asyncio.to_thread(self._engine, spec)
            except Exception:
                log.exception("building the frontend of %s failed; unloading its weights again", spec.name)
                await self.models.unload(spec.name)
                raise
            self.registry.add(engine)
            log.info("loaded %s at runtime in %.1f s", spec.name, time.perf_counter() - started)
            return spec.name

    # --- unload ----------------------------------------------------------------------------

    async def unload(self, model_id: str) -> str:
        """Unload ``model_id`` from both processes (``DELETE /v1/models/{id}``); returns its name."""
        self._check_enabled()
        spec = self._spec(model_id)
        if spec.name == self.registry.default:
            raise DefaultModelPinned(spec.name)
        async with self._lock(spec.name):
            if spec.name not in self.registry:
                raise ModelNotFound(model_id, self.registry.names())
            await self._remove(spec.name, reason="request")
        return spec.name

    async def _remove(self, name: str, *, reason: str) -> None:
        """Take ``name`` out of service here, let its requests drain, then drop the weights."""
        entry = self.registry.remove(name)
        if entry is None:
            return
        deadline = time.monotonic() + self.drain_timeout
        while self.registry.in_flight(entry) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if busy := self.registry.in_flight(entry):
            log.warning("unloading %s with %d request(s) still in flight after %.0f s; they will fail", name, busy,
                        self.drain_timeout)
        try:
            await self.models.unload(name)
        finally:
            del entry
            gc.collect()
        from openstt.metrics import metrics

        metrics().model_unloads.labels(name, reason).inc()
        log.info("unloaded %s (%s)", name, reason)

    # --- idle TTL --------------------------------------------------------------------------

    async def unload_idle(self, now: float | None = None) -> list[str]:
        """Unload every model idle for the TTL (never the default, never one in use)."""
        if not self.idle_ttl:
            return []
        unloaded = []
        for name in self.registry.idle(self.idle_ttl, now):
            lock = self._lock(name)
            if lock.locked():
                continue  # being loaded or unloaded right now
            async with lock:
                if name in self.registry.idle(self.idle_ttl, now):  # still idle, still loaded
                    log.info("%s idle for %g s: unloading", name, self.idle_ttl)
                    await self._remove(name, reason="idle")
                    unloaded.append(name)
        return unloaded

    def check_interval(self) -> float:
        return min(max(self.idle_ttl / 4, 0.5), 60.0)

    async def _until_ready(self) -> None:
        """Until the model service answers that its models are loaded."""
        while True:
            try:
                if await asyncio.wait_for(self.models.ready(), timeout=5):
                    return
            except Exception:  # not up yet (a large model loads for minutes)
                pass
            await asyncio.sleep(min(self.check_interval(), 1.0))

    async def _reap_forever(self) -> None:
        # The TTL counts from when the models can serve, not from this process's start: a model
        # whose load (or the server's other loads) takes longer than the TTL must not be unloaded
        # before its first request (3 s TTL, tiny.en + base quantised to int8 at start-up).
        await self._until_ready()
        self.registry.touch_all()
        while True:
            await asyncio.sleep(self.check_interval())
            try:
                await self.unload_idle()
            except Exception:
                log.exception("idle unloading failed")

    def start(self) -> None:
        """Start the idle checker on the running event loop (no-op without a TTL, without a
        running loop, or when already started)."""
        if not self.idle_ttl or (self._reaper is not None and not self._reaper.done()):
            return
        if not self.models.manageable:
            log.warning("OPEN_STT_MODEL_IDLE_TTL is ignored: models cannot be unloaded at runtime with several "
                        "model-service replicas")
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._reaper = loop.create_task(self._reap_forever())
        log.info("models idle for %g s are unloaded (except the default, %s)", self.idle_ttl, self.registry.default)

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reaper
            self._reaper = None
