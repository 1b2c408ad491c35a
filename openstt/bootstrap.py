"""Startup: settings from the environment, model resolution, and attaching models to the app."""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import TYPE_CHECKING

from fastapi import FastAPI
from pydantic import ValidationError

from openstt.catalog import CATALOG
from openstt.hub import ModelNotAvailable, cache_dir, resolve_model
from openstt.logs import configure_logging
from openstt.registry import ModelRegistry
from openstt.settings import Settings, format_validation_error

if TYPE_CHECKING:
    from openstt.catalog import ModelSpec
    from openstt.engines.base import Engine
    from openstt.model_client import ModelServiceClient

log = logging.getLogger("openstt")


class StartupError(SystemExit):
    """A configuration or model problem that must stop the server, with a message for humans."""

    def __init__(self, message: str):
        super().__init__(f"open-stt: {message}")


def load_settings() -> Settings:
    """The configuration read from the environment now, validated (``StartupError`` if invalid)."""
    try:
        return Settings()
    except ValidationError as exc:
        raise StartupError("invalid configuration:\n" + format_validation_error(exc)) from None


@functools.cache
def get_settings() -> Settings:
    """This process's one validated configuration, built on first use. Invalid, it raises the
    ``StartupError`` again at every call (nothing is cached)."""
    return load_settings()


def prepare_models(settings: Settings) -> None:
    """Make sure every configured model is in the cache (downloading it if allowed)."""
    configure_logging(settings.python_log_level, settings.log_format)
    from openstt.device import Placement

    try:
        placement = Placement.from_settings(settings)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    if settings.role == "api":  # the weights are the model service's; here only tokenizers load
        log.info("memory: not checked here (role api: the model service holds the weights)")
    else:
        check_memory(settings, placement)  # before any download: refusing a 48 GB model must not fetch it first
    if settings.enable_diarization and settings.role != "api":
        from openstt.diarization.weights import DiarizationUnavailable, weights_path

        try:
            weights_path(download=settings.download)
        except DiarizationUnavailable as exc:
            raise StartupError(str(exc)) from None
    for name in settings.models:
        try:
            resolve_model(CATALOG[name], download=settings.download)
        except ModelNotAvailable as exc:
            raise StartupError(str(exc)) from None


# Set by open-stt-server once it has run prepare_models, so the `bentoml serve` it starts does
# not repeat the checks (and their log lines).
PREPARED_ENV = "OPEN_STT_PREPARED"


def prepare_once() -> None:
    """The `bentoml serve` parent's startup check; skipped when open-stt-server already ran it."""
    if os.environ.get(PREPARED_ENV) != "1":
        prepare_models(get_settings())


def check_memory(settings: Settings, placement) -> None:
    """Log the configured models' memory estimate; refuse (``memory_check=auto``) what cannot fit."""
    from openstt.memory import DIARIZATION, NotEnoughMemory, check

    try:
        check([CATALOG[name] for name in settings.models], placement.device.type,
              str(placement.dtype).removeprefix("torch."), placement.quantize, model_batch_windows(settings),
              settings.memory_check, extra=(DIARIZATION,) if settings.enable_diarization else ())
    except NotEnoughMemory as exc:
        raise StartupError(str(exc)) from None
    except Exception as exc:  # guidance only: a failing estimate never stops a server that may well fit
        log.warning("memory: check skipped (%s)", exc)


def model_batch_windows(settings: Settings) -> int:
    """The model service's batch of windows: ``OPEN_STT_MAX_BATCH_WINDOWS``, or the device's
    default; on a GPU, the largest its memory holds by the estimate (16, 32 or 64), not a fixed 16."""
    from openstt.device import Placement

    placement = Placement.from_settings(settings)
    if settings.max_batch_windows is not None or placement.device.type != "cuda":
        return settings.batch_windows
    from openstt.memory import capacity

    return _gpu_batch(tuple(settings.models), str(placement.dtype).removeprefix("torch."), placement.quantize,
                      settings.enable_diarization, capacity("cuda").total)


@functools.lru_cache(maxsize=8)
def _gpu_batch(models: tuple[str, ...], dtype: str, quantize: str, diarization: bool, total: int) -> int:
    from openstt.memory import DIARIZATION, Capacity, largest_batch

    batch = largest_batch([CATALOG[name] for name in models], "cuda", dtype, quantize, Capacity("cuda", total, total),
                          extra=(DIARIZATION,) if diarization else ())
    log.info("batch: %d windows, the largest the GPU's %.0f GB holds by the estimate "
             "(OPEN_STT_MAX_BATCH_WINDOWS sets it)", batch, total / 1e9)
    return batch


def load_models() -> ModelRegistry:
    """Load every configured model's weights (the model service, or a single-process server)."""
    settings = get_settings()
    configure_logging(settings.python_log_level, settings.log_format)
    started = time.perf_counter()
    try:
        registry = _load_weights(settings)
    except (ModelNotAvailable, ValueError) as exc:
        raise StartupError(str(exc)) from None
    log.info("models loaded in %.1f s: %s", time.perf_counter() - started, ", ".join(registry.names()))
    for name in registry.names():
        log.info("model %s", registry.get(name).describe())
    return registry


def _load_weights(settings: Settings) -> ModelRegistry:
    """Resolve every configured model in the HF cache (downloading if allowed) and load it."""
    import torch

    from openstt.device import Placement
    from openstt.engines import load_weights

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    placement = Placement.from_settings(settings)
    engines = [load_weights(CATALOG[name], placement, download=settings.download,
                            chunk_seconds=settings.voxtral_chunk_seconds, batch_windows=model_batch_windows(settings))
               for name in settings.models]
    return ModelRegistry(engines, settings.default_model or settings.models[0], settings.model_aliases)


def start_compute():
    """The model service's compute thread (``openstt.compute``), batching windows up to the
    configured size; on a CPU, file windows yield to live ones while live sessions are active."""
    from openstt.compute import ComputeThread
    from openstt.device import Placement

    settings = get_settings()
    return ComputeThread(max_batch=model_batch_windows(settings),
                         yield_to_live=Placement.from_settings(settings).device.type == "cpu")


def load_diarizer():
    """The speaker-diarization pipeline on the models' device, when enabled (else None)."""
    settings = get_settings()
    if not settings.enable_diarization:
        return None
    from openstt.device import Placement
    from openstt.diarization.pipeline import Diarizer
    from openstt.diarization.weights import DiarizationUnavailable

    started = time.perf_counter()
    try:
        diarizer = Diarizer.load(Placement.from_settings(settings).device, download=settings.download)
    except DiarizationUnavailable as exc:
        raise StartupError(str(exc)) from None
    log.info("diarization: speaker model loaded in %.1f s on %s", time.perf_counter() - started, diarizer.device)
    return diarizer


def weights_manager(registry: ModelRegistry):
    """The model service's runtime loading and unloading of weights into ``registry``."""
    from openstt.device import Placement
    from openstt.metrics import metrics
    from openstt.serving import WeightsManager

    settings = get_settings()
    metrics().models_loaded.set(len(registry.names()))
    return WeightsManager(registry, Placement.from_settings(settings), download=settings.download,
                          chunk_seconds=settings.voxtral_chunk_seconds, memory_check=settings.memory_check,
                          batch_windows=model_batch_windows(settings))


def attach(app: FastAPI, registry: ModelRegistry, settings: Settings | None = None, manager=None) -> None:
    """Serve ``registry`` from ``app`` with the configured keys and limits (and ``manager``, the
    runtime model management, when the models can be loaded and unloaded)."""
    settings = settings or get_settings()
    from openstt.api.body_limits import BodyDeadline
    from openstt.api.limits import AudioBudget, Limits, LiveLimits, default_audio_budget
    from openstt.api.state import app_state

    state = app_state(app)
    state.model_manager = manager
    state.api_keys = [k.get_secret_value() for k in settings.api_key]
    state.protect_metrics_and_ui = settings.protect_metrics_and_ui
    state.max_upload_bytes = settings.max_upload_bytes
    state.long_form = settings.long_form
    state.beam_size = settings.beam_size
    state.diarization = settings.enable_diarization
    state.limits = Limits(max_in_flight=settings.max_concurrent_requests,
                          max_audio_seconds=settings.max_audio_seconds, request_timeout=settings.request_timeout,
                          max_uploads=settings.max_uploads_in_progress,
                          audio=AudioBudget(settings.audio_memory_budget_mb << 20 if settings.audio_memory_budget_mb
                                            else default_audio_budget()),
                          body=BodyDeadline(min_rate=settings.upload_min_bytes_per_second,
                                            timeout=settings.upload_timeout))
    state.live_limits = LiveLimits(max_sessions=settings.max_live_sessions,
                                   max_session_seconds=settings.live_max_session_seconds,
                                   max_buffer_seconds=settings.live_max_buffer_seconds,
                                   max_message_bytes=settings.live_max_message_bytes,
                                   idle_timeout=settings.live_idle_timeout,
                                   max_interim_decodes=settings.live_interim_decodes,
                                   max_speed=settings.live_max_speed,
                                   max_pending_turns=settings.live_max_pending_turns,
                                   max_queued_decodes=settings.live_max_queued_decodes or settings.batch_windows,
                                   audio=state.limits.audio)
    state.registry = registry
    log.info("open-stt ready on port %s: models=%s default=%s cache=%s auth=%s limits: upload=%d B audio=%gs "
             "concurrent=%d timeout=%ds batch=%d windows long-form=%s diarization=%s live-sessions=%d; try it at /ui, metrics at /metrics",
             settings.port,
             ",".join(registry.names()), registry.default, cache_dir(),
             f"on ({len(settings.api_key)} key(s))" if settings.api_key else "off", settings.max_upload_bytes,
             settings.max_audio_seconds, settings.max_concurrent_requests, settings.request_timeout,
             settings.batch_windows, settings.long_form, "on" if settings.enable_diarization else "off",
             settings.max_live_sessions)
    if manager is not None:
        log.info("model management: endpoints %s, idle unload %s", "on" if manager.enabled else "off",
                 f"after {manager.idle_ttl:g} s" if manager.idle_ttl else "off")


def start_api(app: FastAPI, models: ModelServiceClient) -> ModelRegistry:
    """API side of the two-service layout: tokenizers here, weights in the model service, which
    ``models`` calls: to decode windows, to probe readiness (``/health``), and to load and unload
    models at runtime (when enabled) and idle ones (with a TTL)."""
    from openstt.api.state import app_state
    from openstt.engines import remote_engine
    from openstt.model_manager import ModelManager

    import torch

    settings = get_settings()
    configure_logging(settings.python_log_level, settings.log_format)
    # This process's torch work (VAD, live audio) is small next to decoding and runs while the model
    # service decodes on the same cores: one thread, so no OpenMP pool spins against the model
    # service's (10 min of VAD: 0.76 s on one thread, 0.61 s on two).
    torch.set_num_threads(1)
    def build(spec: ModelSpec) -> Engine:  # tokenizers only: windows go to ``models``
        return remote_engine(spec, models, chunk_seconds=settings.voxtral_chunk_seconds,
                             max_batch_windows=settings.batch_windows)

    registry = ModelRegistry([build(CATALOG[name]) for name in settings.models],
                             settings.default_model or settings.models[0], settings.model_aliases)
    manager = ModelManager(
        registry, models=models, engine=build,
        enabled=settings.enable_model_management, idle_ttl=settings.model_idle_ttl)
    app_state(app).models_ready = models.ready
    app_state(app).model_replicas = models.status
    app_state(app).diarize = models.diarize
    attach(app, registry, settings, manager)  # the app's lifespan starts the manager's idle checker
    return registry
