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
OPEN_PATHS = frozenset({"/health", "/ui"})

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


def key_accepted(token: str, keys: Sequence[str]) -> bool:
    """Whether ``token`` is one of ``keys``, compared in constant time against each."""
    return any([hmac.compare_digest(token.encode(), k.encode()) for k in keys])  # no short-circuit


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
        elif key_accepted(token, keys):
            await self.app(scope, receive, send)
            return
        else:
            error = OpenAIError(401, f"Incorrect API key provided: {_mask(token)}.", code="invalid_api_key")
        log.info("rejected unauthenticated %s %s", scope.get("method"), scope["path"])
        await error.response()(scope, receive, send)


class MaxBodySizeMiddleware:
    """Reject request bodies over a limit with OpenAI's 413, before the multipart form is parsed.

    ``Content-Length`` is checked up front; chunked uploads are counted as they stream in, and on
    overflow the app sees a disconnect while the client gets the 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int]):
        self.app, self.max_bytes = app, max_bytes

    @staticmethod
    def _error(limit: int, read: int) -> OpenAIError:
        return OpenAIError(413, f"Maximum content size limit ({limit}) exceeded ({read} bytes read)",
                           type="server_error")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.max_bytes() if scope["type"] == "http" else 0
        if not limit:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            await self._error(limit, int(declared)).response()(scope, receive, send)
            return

        received = 0
        rejected = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    rejected = True
                    if not response_started:
                        await self._error(limit, received).response()(scope, receive, guarded_send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        async def app_send(message: Message) -> None:
            if rejected:
                return  # the 413 already answered this request
            await guarded_send(message)

        await self.app(scope, limited_receive, app_send)
