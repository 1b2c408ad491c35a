"""ASGI middleware: request ids on every response, and bearer-token auth.

Written as plain ASGI (not ``BaseHTTPMiddleware``) so streamed responses pass through untouched.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Callable, Sequence

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openstt.api.errors import OpenAIError

log = logging.getLogger("openstt.api")

# Paths that stay open when a key is set: load balancers and probes carry no credentials.
OPEN_PATHS = frozenset({"/health"})

MISSING_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


class RequestIdMiddleware:
    """Give every request an id (``x-request-id``), echoed in the response and kept for logs."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = "req_" + uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


def _mask(key: str) -> str:
    return f"{key[:6]}***{key[-4:]}" if len(key) >= 14 else "***"


class ApiKeyMiddleware:
    """Require ``Authorization: Bearer <key>`` on every path but ``OPEN_PATHS`` when keys are set.

    ``keys`` is called per request so a reconfigured app picks up new keys; comparison runs in
    constant time against each accepted key.
    """

    def __init__(self, app: ASGIApp, keys: Callable[[], Sequence[str]]):
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = self.keys() if scope["type"] == "http" else ()
        if not keys or scope["path"] in OPEN_PATHS or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            error = OpenAIError(401, MISSING_KEY_MESSAGE)
        elif any([hmac.compare_digest(token.encode(), k.encode()) for k in keys]):  # no short-circuit
            await self.app(scope, receive, send)
            return
        else:
            error = OpenAIError(401, f"Incorrect API key provided: {_mask(token)}.", code="invalid_api_key")
        log.info("rejected unauthenticated %s %s", scope.get("method"), scope["path"])
        await error.response()(scope, receive, send)
