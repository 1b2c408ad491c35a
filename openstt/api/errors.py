"""OpenAI's error envelope, and handlers that put every failure into it.

Clients (the official SDKs above all) read ``{"error": {"message", "type", "param", "code"}}``
and decide on retries from the status: deterministic problems must be 4xx, or one bad upload
gets transcribed three times.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def model_not_found(name: str, available: list[str], alias_of: str | None = None) -> OpenAIError:
    reason = (f"is an alias of `{alias_of}`, which is not loaded now" if alias_of
              else "does not exist or you do not have access to it")
    return OpenAIError(404, f"The model `{name}` {reason}. Models served here: {', '.join(available)}.",
                       param="model", code="model_not_found")


def internal_error(request_id: str | None) -> OpenAIError:
    suffix = f" (request id {request_id})" if request_id else ""
    return OpenAIError(500, INTERNAL_ERROR_MESSAGE + suffix, type="server_error")


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def install_error_handlers(app: FastAPI) -> None:
    """Route FastAPI/Starlette's own errors (422, 404, 405, crashes) through the envelope."""

    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

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
