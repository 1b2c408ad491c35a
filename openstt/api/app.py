"""The FastAPI app: OpenAI's audio and model routes, assembled.

``create_app`` builds it once per process: middleware, lifespan, error handlers and the routers
(``routes_ops``: /health, /ui; ``routes_models``: /v1/models and runtime load/unload;
``routes_audio``: /v1/audio/transcriptions and /translations; ``routes_realtime``: live
transcription on WebSocket /v1/realtime). The service attaches the loaded
``ModelRegistry`` (and the settings) to its ``AppState`` (``openstt.api.state``) when its models
are ready. Until then, routes answer 503.
"""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from openstt.api import routes_audio, routes_models, routes_ops, routes_realtime
from openstt.api.body_limits import BodyLimitsMiddleware
from openstt.api.errors import OpenAIError, install_error_handlers
from openstt.api.middleware import ApiKeyMiddleware, RequestIdMiddleware
from openstt.api.state import AppState, app_state


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    # BentoML enters a mounted app's lifespan after the service's __init__ has attached the manager
    manager = app_state(app).model_manager
    if manager is not None:
        manager.start()  # the idle checker: started here only
    yield
    manager = app_state(app).model_manager
    if manager is not None:
        await manager.stop()


def _include(app: FastAPI, router: APIRouter) -> None:
    """Add ``router``'s routes to the app's own list, as they are. (``app.include_router`` now adds
    one lazy entry per router instead, without a ``path``, and BentoML lists a mounted app's paths,
    in ``/schema.json`` and a bento's ``apis/schema.json``, from the ``path`` of each of ``app.routes``.)"""
    app.router.routes.extend(router.routes)


def create_app() -> FastAPI:
    """Build the app; set ``app_state(app).registry`` (``bootstrap.attach`` does, with the settings) to serve."""
    app = FastAPI(title="open-stt", version="0.1.0", docs_url="/docs", redoc_url=None, lifespan=_lifespan)
    app.state.openstt = AppState()
    install_error_handlers(app)
    app.add_middleware(BodyLimitsMiddleware, max_bytes=lambda: app_state(app).max_upload_bytes,
                       deadline=lambda: app_state(app).limits.body)
    app.add_middleware(ApiKeyMiddleware, keys=lambda: app_state(app).api_keys,
                       protect_metrics_and_ui=lambda: app_state(app).protect_metrics_and_ui)
    app.add_middleware(RequestIdMiddleware)

    # in this order (the OpenAPI document's); the /v1 catch-all below must come after them all
    _include(app, routes_ops.router)
    _include(app, routes_models.router)
    _include(app, routes_audio.router)
    _include(app, routes_realtime.router)  # WebSocket /v1/realtime (live transcription)

    # Unknown /v1 paths and wrong methods get OpenAI's "Invalid URL" envelope rather than
    # BentoML's plain 404 (a mounted app only sees paths one of its routes matches).
    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def invalid_url(path: str, request: Request) -> Response:
        raise OpenAIError(404, f"Invalid URL ({request.method} {request.url.path})")

    return app
