"""The FastAPI app with OpenAI's audio and model routes.

The app is built once per process; the service attaches the loaded ``ModelRegistry`` (and the
settings) to ``app.state`` when its models are ready. Until then, routes answer 503.
"""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from openstt.api.errors import OpenAIError, bad_request, install_error_handlers, model_not_found, request_id_of
from openstt.api.forms import AudioRequest, parse_audio_form, read_form
from openstt.api.middleware import ApiKeyMiddleware, RequestIdMiddleware
from openstt.audio import AudioError, decode_audio
from openstt.engines.base import TranscribeOptions, UnsupportedRequest
from openstt.formats import RENDERED_FORMATS, render
from openstt.registry import ModelRegistry, UnknownModel

log = logging.getLogger("openstt.api")

OWNER = "open-stt-server"


def _registry(request: Request) -> ModelRegistry:
    registry = getattr(request.app.state, "registry", None)
    if registry is None:
        raise OpenAIError(503, "The server is still loading its models; retry shortly.", type="server_error",
                          headers={"retry-after": "5"})
    return registry


def _model_object(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": OWNER}


async def _transcribe(request: Request, task: str) -> Response:
    registry = _registry(request)
    req: AudioRequest = parse_audio_form(await read_form(request), task=task)
    try:
        engine = registry.get(req.model)
    except UnknownModel as exc:
        raise model_not_found(exc.name, exc.available) from None
    if req.response_format not in RENDERED_FORMATS:
        raise bad_request(
            f"response_format '{req.response_format}' is not supported by this server version yet. "
            f"Use one of: {', '.join(RENDERED_FORMATS)}.",
            param="response_format", code="unsupported_value",
        )
    if req.stream:
        raise bad_request("Streaming (stream=true) is not supported by this server version yet.",
                          param="stream", code="unsupported_value")

    started = time.perf_counter()
    try:
        # Decoding and inference run in worker threads so the event loop (and /health) stay free.
        audio = await run_in_threadpool(decode_audio, req.file.file)
        options = TranscribeOptions(task=task, language=req.language, prompt=req.prompt,
                                    temperature=req.temperature)
        transcript = await run_in_threadpool(engine.transcribe, audio, options)
    except AudioError as exc:
        raise bad_request(exc.message, param=exc.param, code=exc.code) from None
    except UnsupportedRequest as exc:
        raise bad_request(exc.message, param=exc.param, code=exc.code) from None
    finally:
        await req.file.close()
    elapsed = time.perf_counter() - started
    log.info("%s %s model=%s audio=%.2fs format=%s took=%.2fs rtf=%.3f", request_id_of(request), task,
             engine.name, transcript.duration, req.response_format, elapsed,
             elapsed / transcript.duration if transcript.duration else 0.0)
    return render(transcript, req.response_format, task=task)


def create_app() -> FastAPI:
    """Build the app; attach ``app.state.registry`` (and ``app.state.api_keys``) to serve."""
    app = FastAPI(title="open-stt", version="0.1.0", docs_url="/docs", redoc_url=None)
    app.state.registry = None
    app.state.api_keys = []
    install_error_handlers(app)
    app.add_middleware(ApiKeyMiddleware, keys=lambda: app.state.api_keys)
    app.add_middleware(RequestIdMiddleware)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        if getattr(request.app.state, "registry", None) is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        registry = _registry(request)
        data = [_model_object(name, registry.created(name)) for name in registry.names()]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> JSONResponse:
        registry = _registry(request)
        try:
            name = registry.resolve(model_id)
        except UnknownModel:
            raise OpenAIError(404, f"The model '{model_id}' does not exist", param="model",
                              code="model_not_found") from None
        return JSONResponse(_model_object(model_id, registry.created(name)))

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        return await _transcribe(request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request) -> Response:
        return await _transcribe(request, "translate")

    # Unknown /v1 paths and wrong methods get OpenAI's "Invalid URL" envelope rather than
    # BentoML's plain 404 (a mounted app only sees paths one of its routes matches).
    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def invalid_url(path: str, request: Request) -> Response:
        raise OpenAIError(404, f"Invalid URL ({request.method} {request.url.path})")

    return app
