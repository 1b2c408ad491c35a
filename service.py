"""BentoML wiring: a model service holding the resident models and batching their work, and the
API service with the OpenAI routes mounted at ``/``.

All behaviour lives in the ``openstt`` package; configuration comes from ``OPEN_STT_*``
environment variables (``open-stt-server`` sets them from its flags).
"""

from __future__ import annotations

import bentoml

from openstt.api.app import create_app
from openstt.api.middleware import ApiKeyMiddleware, RequestIdMiddleware
from openstt.api.routes_ops import drain
from openstt.api.state import app_state
from openstt.bootstrap import (
    StartupError,
    get_settings,
    load_diarizer,
    start_compute,
    load_models,
    prepare_once,
    start_api,
    weights_manager,
)
from openstt.messages import AlignJob, AlignReply, DecodeResult, DiarizeJob, DiarizeReply, WeightsReply, WindowJob
from openstt.model_client import ModelServiceClient
from openstt.replicas import ReplicaPool
from openstt.serving import align_request, diarize_request
from openstt.compute import run_aside
from openstt.logs import quiet_caller_disconnects
from openstt.settings import Settings
from openstt.shutdown import Activity, defer_sigterm, defer_sigterm_until_idle

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

app = create_app()


@bentoml.service(name="OpenSTTModels", workers=1, traffic={"timeout": REQUEST_TIMEOUT_S})
class OpenSTTModels:
    """Loads every configured model once and decodes windows from all requests in batches;
    models can be loaded and unloaded at runtime (``load_model``/``unload_model``).

    All torch work runs on one compute thread, in front of which the windows of every request
    queue (``openstt/compute.py`` says why); the APIs below only queue work and await it."""

    def __init__(self) -> None:
        quiet_caller_disconnects()  # the API process cancels the calls of requests whose client left
        self.compute = start_compute()  # windows of OPEN_STT_MAX_BATCH_WINDOWS at most
        self.registry = self.compute.call(load_models)
        self.compute.engines = self.registry.engines
        self.weights = weights_manager(self.registry)
        self.diarizer = self.compute.call(load_diarizer)  # None unless --enable-diarization
        # keep serving windows to in-flight transcriptions after SIGTERM (see openstt/shutdown.py)
        self.activity = Activity()
        defer_sigterm_until_idle(self.activity, max_wait=REQUEST_TIMEOUT_S,
                                 idle_seconds=SETTINGS.shutdown_idle_seconds)

    @bentoml.api
    async def decode_windows(self, jobs: list[WindowJob]) -> list[DecodeResult]:
        with self.activity:
            return await self.compute.decode(jobs)

    @bentoml.api
    async def align(self, job: AlignJob) -> AlignReply:
        with self.activity:
            return await self.compute.run(lambda: align_request(self.registry.engine(job.model), job))

    # A request's speakers are found while its windows are decoded: its diarization takes its turn
    # on the compute thread between their batches.
    @bentoml.api
    async def diarize(self, job: DiarizeJob) -> DiarizeReply:
        with self.activity:
            return await self.compute.run(diarize_request, self.diarizer, job)

    # Loading runs beside the compute thread (which keeps decoding), on one torch thread.
    @bentoml.api
    async def load_model(self, name: str) -> WeightsReply:
        return await run_aside(self.weights.load, name)

    @bentoml.api
    async def unload_model(self, name: str) -> WeightsReply:
        return await run_aside(self.weights.unload, name)

    @bentoml.api
    def ready(self) -> bool:
        return not self.activity.draining  # stopping: API replicas send new work to the others


@bentoml.service(name="OpenSTT", workers=1, traffic={"timeout": REQUEST_TIMEOUT_S})
@bentoml.asgi_app(app, path="/")
class OpenSTT:
    models = bentoml.depends(OpenSTTModels)

    def __init__(self) -> None:
        self.registry = start_api(app, ModelServiceClient(self._model_service()))
        # on SIGTERM: no new work, and live sessions complete their committed turns and close with 1012
        defer_sigterm(lambda: drain(app), "shutdown requested: taking no new work, finishing live sessions' turns")

    def _model_service(self):
        """The model service in this `bentoml serve`, or (OPEN_STT_ROLE=api) its replicas, reached
        over HTTP as BentoML reaches a remote dependency: pickled messages, its traffic timeout."""
        settings = get_settings()
        if settings.role != "api":
            return self.models
        from _bentoml_impl.client import RemoteProxy

        return ReplicaPool(settings.model_service_url,
                           connect=lambda url: RemoteProxy(url, service=OpenSTTModels).as_service())

    @bentoml.on_deployment
    def prepare() -> None:
        # Runs once in the `bentoml serve` parent before workers start: validate the
        # configuration and fetch missing weights (with --download) a single time, so a bad
        # setup stops the server with a clear message instead of crash-looping workers.
        prepare_once()


# BentoML's own routes (/metrics, /schema.json and /docs.json, which hold the app's OpenAPI paths,
# its index page and assets) answer beside the app, where the app's ApiKeyMiddleware never sees
# them. These wrap every route of the API service: the same key policy, and one request id (the
# app's RequestIdMiddleware keeps it). The model service listens on a private socket only.
OpenSTT.add_asgi_middleware(RequestIdMiddleware)
OpenSTT.add_asgi_middleware(ApiKeyMiddleware, keys=lambda: app_state(app).api_keys,
                            protect_metrics_and_ui=lambda: app_state(app).protect_metrics_and_ui)
