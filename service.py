"""BentoML wiring: a model service holding the resident models and batching their work, and the
API service with the OpenAI routes mounted at ``/``.

All behaviour lives in the ``openstt`` package; configuration comes from ``OPEN_STT_*``
environment variables (``open-stt-server`` sets them from its flags).
"""

from __future__ import annotations

import asyncio

import bentoml

from openstt.api.app import create_app
from openstt.bootstrap import (
    StartupError,
    get_settings,
    load_diarizer,
    load_models,
    prepare_once,
    start_api,
    weights_manager,
)
from openstt.model_service import (
    AlignJob,
    AlignReply,
    DecodeResult,
    DiarizeJob,
    DiarizeReply,
    LiveFirst,
    ModelServiceClient,
    WeightsReply,
    WindowJob,
    align_request,
    decode_batch,
    diarize_request,
)
from openstt.settings import Settings
from openstt.shutdown import Activity, defer_sigterm_until_idle

try:
    SETTINGS = get_settings()  # the same validated object the services below start from
except StartupError:
    # Not configured (`bentoml build` imports this file too): the defaults stand in for the
    # decorators below, and serving stops in prepare() with the configuration's problems.
    SETTINGS = Settings.model_construct()
# Long audio takes long: BentoML's 60 s default would cut off a 20-minute file on CPU. The app
# enforces OPEN_STT_REQUEST_TIMEOUT itself (with an OpenAI-style 504); BentoML's plain-text one
# is set a minute later so it never fires first.
REQUEST_TIMEOUT_S = SETTINGS.request_timeout + 60
# Windows decoded together: OPEN_STT_MAX_BATCH_WINDOWS, else the device's default (8 on CPU,
# where larger batches overflow the caches, 16 on GPUs).
MAX_BATCH_WINDOWS = SETTINGS.batch_windows

app = create_app()


@bentoml.service(name="OpenSTTModels", workers=1, traffic={"timeout": REQUEST_TIMEOUT_S})
class OpenSTTModels:
    """Loads every configured model once and decodes windows from all requests in batches;
    models can be loaded and unloaded at runtime (``load_model``/``unload_model``)."""

    def __init__(self) -> None:
        self.registry = load_models()
        self.weights = weights_manager(self.registry)
        self.diarizer = load_diarizer()  # None unless --enable-diarization
        self.live_first = LiveFirst()  # live sessions' windows before file windows
        # keep serving windows to in-flight transcriptions after SIGTERM (see openstt/shutdown.py)
        self.activity = Activity()
        defer_sigterm_until_idle(self.activity, max_wait=REQUEST_TIMEOUT_S,
                                 idle_seconds=SETTINGS.shutdown_idle_seconds)

    # max_latency_ms is the budget for one batch; a small one makes BentoML shed load with 503s.
    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_WINDOWS, max_latency_ms=REQUEST_TIMEOUT_S * 1000)
    def decode_windows(self, jobs: list[WindowJob]) -> list[DecodeResult]:
        with self.activity:
            return decode_batch(self.registry.engines(), jobs, self.live_first)

    # Live sessions' windows (WebSocket /v1/realtime) are batched in a queue of their own and
    # decoded in a thread of their own, before file windows (LiveFirst): a live turn waits at most
    # for the file window being decoded, never for the file windows queued behind it.
    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_WINDOWS, max_latency_ms=REQUEST_TIMEOUT_S * 1000)
    async def decode_live_windows(self, jobs: list[WindowJob]) -> list[DecodeResult]:
        with self.activity, self.live_first.live():
            return await asyncio.to_thread(decode_batch, self.registry.engines(), jobs)

    @bentoml.api
    def align(self, job: AlignJob) -> AlignReply:
        with self.activity:
            return align_request(self.registry.engine(job.model), job)

    # Async, in a thread of its own: a request's speakers are found while its windows are decoded.
    @bentoml.api
    async def diarize(self, job: DiarizeJob) -> DiarizeReply:
        with self.activity:
            return await asyncio.to_thread(diarize_request, self.diarizer, job)

    # Async, loading in a thread of its own: the sync APIs' single worker thread keeps decoding.
    @bentoml.api
    async def load_model(self, name: str) -> WeightsReply:
        return await asyncio.to_thread(self.weights.load, name)

    @bentoml.api
    async def unload_model(self, name: str) -> WeightsReply:
        return await asyncio.to_thread(self.weights.unload, name)

    @bentoml.api
    def ready(self) -> bool:
        return True


@bentoml.service(name="OpenSTT", workers=1, traffic={"timeout": REQUEST_TIMEOUT_S})
@bentoml.asgi_app(app, path="/")
class OpenSTT:
    models = bentoml.depends(OpenSTTModels)

    def __init__(self) -> None:
        self.registry = start_api(app, ModelServiceClient(self.models))

    @bentoml.on_deployment
    def prepare() -> None:
        # Runs once in the `bentoml serve` parent before workers start: validate the
        # configuration and fetch missing weights (with --download) a single time, so a bad
        # setup stops the server with a clear message instead of crash-looping workers.
        prepare_once()
