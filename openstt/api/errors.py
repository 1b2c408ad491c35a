"""OpenAI's error envelope, and handlers that put every failure into it.

Clients (the official SDKs above all) read ``{"error": {"message", "type", "param", "code"}}``
and decide on retries from the status: deterministic problems must be 4xx, or one bad upload
gets transcribed three times.

The domain's errors (``openstt.errors``: unknown model, management disabled, ...) carry their own
message; ``openai_error`` adds the status, type, code and param they are answered with, and the
handler ``install_error_handlers`` registers lets routes simply let them propagate.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from openstt.errors import (
    DefaultModelPinned,
    ModelIsAlias,
    ModelLoadFailed,
    ModelManagementDisabled,
    ModelManagementReplicated,
    ModelNotFound,
    ModelsLoading,
    OpenSTTError,
    ShuttingDown,
)
from openstt.messages import ErrorCode, ModelFailure

log = logging.getLogger("openstt.api")

INTERNAL_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"


class OpenAIError(Exception):
    """An error to answer with, already in OpenAI's terms."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}
        # for metrics and logs: why it failed, even where OpenAI's envelope has no code
        self.reason = reason or code or type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, *, param: str | None = None, code: str | None = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def internal_error(request_id: str | None) -> OpenAIError:
    suffix = f" (request id {request_id})" if request_id else ""
    return OpenAIError(500, INTERNAL_ERROR_MESSAGE + suffix, type="server_error")


# How each domain error is answered: its status and OpenAI's type/param/code (the message is its own).
_ANSWERS: dict[type[OpenSTTError], tuple[int, dict]] = {
    ModelsLoading: (503, {"type": "server_error", "headers": {"retry-after": "5"}}),
    # The SDK retries a 503 after Retry-After: by then the load balancer sends it to another pod.
    ShuttingDown: (503, {"type": "server_error", "code": "server_shutting_down", "headers": {"retry-after": "1"}}),
    ModelNotFound: (404, {"param": "model", "code": "model_not_found"}),
    ModelIsAlias: (400, {"param": "model", "code": "invalid_value"}),
    ModelManagementDisabled: (403, {"code": "model_management_disabled"}),
    ModelManagementReplicated: (409, {"code": "model_management_unavailable"}),
    DefaultModelPinned: (409, {"param": "model", "code": "default_model"}),
}
# A failed runtime load, by the model service's code; any other code: model_not_available.
_LOAD_FAILURES: dict[ErrorCode, tuple[int, dict]] = {
    ErrorCode.download_failed: (502, {"type": "server_error", "code": "model_download_failed"}),
    ErrorCode.insufficient_memory: (400, {"param": "model", "code": "insufficient_memory"}),
}
_LOAD_FAILED = (400, {"param": "model", "code": "model_not_available"})


def openai_error(exc: OpenAIError | OpenSTTError, request_id: str | None = None) -> OpenAIError:
    """``exc`` as the API answers it (an ``OpenAIError`` is already)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ModelLoadFailed):
        answer = _LOAD_FAILURES.get(exc.code, _LOAD_FAILED)
    else:
        answer = next((_ANSWERS[kind] for kind in type(exc).__mro__ if kind in _ANSWERS), None)
    if answer is None:  # a domain error without an answer yet: a bug here, not the client's
        log.error("no response defined for %s: %s (request id %s)", type(exc).__name__, exc, request_id)
        return internal_error(request_id)
    status, fields = answer
    headers = dict(fields.get("headers", {}))
    return OpenAIError(status, exc.message, **{**fields, "headers": headers})


def model_failure(exc: ModelFailure, request_id: str | None, model: str = "") -> OpenAIError:
    """A window of ``model`` failed in the model service while this request ran."""
    if exc.code == ErrorCode.model_not_loaded:
        return OpenAIError(404, f"The model `{model}` was unloaded while this request was in progress.",
                           param="model", code="model_not_found")
    if exc.code == ErrorCode.out_of_memory:
        return OpenAIError(503, "The model ran out of memory on this request. Retry later or send shorter audio.",
                           type="server_error", code="model_out_of_memory", headers={"retry-after": "10"})
    return internal_error(request_id)


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def install_error_handlers(app: FastAPI) -> None:
    """Route the domain's errors and FastAPI/Starlette's own (422, 404, 405, crashes) through the envelope."""

    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(OpenSTTError)
    async def _domain(request: Request, exc: OpenSTTError) -> JSONResponse:
        return openai_error(exc, request_id_of(request)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
        message = first.get("msg", "Invalid request")
        return bad_request(f"{message}: {'.'.join(loc)}" if loc else message, param=loc[-1] if loc else None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code in (404, 405):
            err = OpenAIError(404, f"Invalid URL ({request.method} {request.url.path})")
        else:
            err = OpenAIError(exc.status_code, str(exc.detail),
                              type="server_error" if exc.status_code >= 500 else "invalid_request_error")
        return err.response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s (request id %s)", request.method, request.url.path,
                      request_id_of(request))
        return internal_error(request_id_of(request)).response()
