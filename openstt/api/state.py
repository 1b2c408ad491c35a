"""What the app serves with: one typed object on ``app.state``, read and written through ``app_state``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from openstt.api.limits import Limits, LiveLimits
from openstt.errors import ModelsLoading, ShuttingDown
from openstt.settings import MAX_UPLOAD_BYTES, Settings

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from openstt.model_manager import ModelManager
    from openstt.messages import DiarizeJob, DiarizeReply
    from openstt.registry import ModelRegistry


def _setting_default(name: str):
    return Settings.model_fields[name].default


@dataclass
class AppState:
    """Created with the app (``create_app``: defaults, no models); ``bootstrap.attach`` fills it
    from the settings once the models are loaded. Tests set fields directly."""

    registry: ModelRegistry | None = None  # None: still loading, the routes answer 503
    model_manager: ModelManager | None = None  # runtime load/unload and the idle TTL (two-service layout)
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    protect_metrics_and_ui: bool = False  # /metrics and /ui need the key too (when keys are set)
    max_upload_bytes: int = MAX_UPLOAD_BYTES  # whole request body; 0: unchecked
    long_form: str = _setting_default("long_form")  # "vad" or "sequential", without chunking_strategy
    beam_size: int = _setting_default("beam_size")  # Whisper's, for requests without beam_size
    limits: Limits = field(default_factory=Limits)
    live_limits: LiveLimits = field(default_factory=LiveLimits)
    # Speaker diarization: on (--enable-diarization), and the model service's call that does it.
    diarization: bool = False
    diarize: Callable[[DiarizeJob], Awaitable[DiarizeReply]] | None = None
    # The model service's readiness probe (two-service layout; None: the weights are in-process),
    # and when it last answered yes (monotonic seconds; /health trusts that for READY_TTL_S).
    models_ready: Callable[[], Awaitable[bool]] | None = None
    models_ready_at: float = float("-inf")
    # How many model-service replicas answered the last probe (split API; None: one, in-process).
    model_replicas: Callable[[], dict | None] | None = None
    # SIGTERM received: /health answers 503 and new work is refused with a 503 to retry elsewhere.
    draining: bool = False

    def serving_registry(self) -> ModelRegistry:
        """The registry to serve with; ``ModelsLoading`` (503) until the models are attached."""
        if self.draining:
            raise ShuttingDown()
        if self.registry is None:
            raise ModelsLoading()
        return self.registry


def app_state(app: Starlette) -> AppState:
    """``app``'s state (``create_app`` sets it)."""
    return app.state.openstt
