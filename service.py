"""BentoML wiring: a model service holding the resident models and batching their work, and the
API service with the OpenAI routes mounted at ``/``.

All behaviour lives in the ``openstt`` package; configuration comes from ``OPEN_STT_*``
environment variables (``open-stt-server`` sets them from its flags).
"""

from __future__ import annotations

import asyncio

import bentoml

from openstt.api.app import create_app
from openstt.batching import (
    AlignRequest,
    WindowReply,
    WindowRequest,
    align_request,
    call_with_reconnect,
    decode_batch,
)
from openstt.bootstrap import load_models, prepare_once, start_api, weights_manager
from openstt.settings import env_int
from openstt.shutdown import Activity, defer_sigterm_until_idle

# Long audio takes long: BentoML's 60 s default would cut off a 20-minute file on CPU. The app
# enforces OPEN_STT_REQUEST_TIMEOUT itself (with an OpenAI-style 504); BentoML's plain-text one
# is set a minute later so it never fires first.
REQUEST_TIMEOUT_S = env_int("OPEN_STT_REQUEST_TIMEOUT", 3600) + 60
# Windows decoded together. Larger batches raise throughput until the device saturates.
MAX_BATCH_WINDOWS = env_int("OPEN_STT_MAX_BATCH_WINDOWS", 16)

app = create_app()


@bentoml.service(name="OpenSTTModels", workers=1, traffic={"timeout": REQUEST_TIMEOUT_S})
class OpenSTTModels:
    """Loads every configured model once and decodes windows from all requests in batches;
    models can be loaded and unloaded at runtime (``load_model``/``unload_model``)."""

    def __init__(self) -> None:
        self.registry = load_models()
        self.weights = weights_manager(self.registry)
        # keep serving windows to in-flight transcriptions after SIGTERM (see openstt/shutdown.py)
        self.activity = Activity()
        defer_sigterm_until_idle(self.activity, max_wait=REQUEST_TIMEOUT_S)

    # max_latency_ms is the budget for one batch; a small one makes BentoML shed load with 503s.
    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_WINDOWS, max_latency_ms=REQUEST_TIMEOUT_S * 1000)
    def decode_windows(self, requests: list[WindowRequest]) -> list[WindowReply]:
        with self.activity:
            return decode_batch(self.registry.engines(), requests)

    @bentoml.api
    def align(self, request: AlignRequest) -> list[list[dict]]:
        with self.activity:
            return align_request(self.registry.engine(request.model), request)

    # Async, loading in a thread of its own: the sync APIs' single worker thread keeps decoding.
    @bentoml.api
    async def load_model(self, name: str) -> dict:
        return await asyncio.to_thread(self.weights.load, name)

    @bentoml.api
    async def unload_model(self, name: str) -> dict:
        return await asyncio.to_thread(self.weights.unload, name)

    @bentoml.api
    def ready(self) -> bool:
        return True


@bentoml.service(name="OpenSTT", workers=1, traffic={"timeout": REQUEST_TIMEOUT_S})
@bentoml.asgi_app(app, path="/")
class OpenSTT:
    models = bentoml.depends(OpenSTTModels)

    def __init__(self) -> None:
        async def decode(request: WindowRequest) -> WindowReply:
            return (await call_with_reconnect(lambda: self.models.to_async.decode_windows([request])))[0]

        async def align(request: AlignRequest) -> list[list[dict]]:
            return await call_with_reconnect(lambda: self.models.to_async.align(request))

        async def models_ready() -> bool:
            return await call_with_reconnect(lambda: self.models.to_async.ready())

        async def load_model(name: str) -> dict:
            return await call_with_reconnect(lambda: self.models.to_async.load_model(name))

        async def unload_model(name: str) -> dict:
            return await call_with_reconnect(lambda: self.models.to_async.unload_model(name))

        app.state.models_ready = models_ready
        self.registry = start_api(app, decode, align, load_model, unload_model)

    @bentoml.on_deployment
    def prepare() -> None:
        # Runs once in the `bentoml serve` parent before workers start: validate the
        # configuration and fetch missing weights (with --download) a single time, so a bad
        # setup stops the server with a clear message instead of crash-looping workers.
        prepare_once()
