"""ASGI middleware: request ids on every response, and API-key auth.

Written as plain ASGI (not ``BaseHTTPMiddleware``) so streamed responses pass through untouched.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import uuid
from collections.abc import Callable, Sequence

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openstt.api.errors import OpenAIError

log = logging.getLogger("openstt.api")

# Open when keys are set: kubelet and load-balancer probes carry no credentials. Each answers
# liveness or readiness only (a status word, no model names, versions or counts).
PROBE_PATHS = frozenset({"/health", "/livez", "/healthz", "/readyz"})
# Also open unless OPEN_STT_PROTECT_METRICS_AND_UI is set: Prometheus scrapes without a key by
# default, and the /ui page asks for the key itself before it calls the API.
METRICS_AND_UI_PATHS = frozenset({"/metrics", "/ui"})

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
        state = scope.setdefault("state", {})
        # the id given by an outer instance (service.py adds one around BentoML's own routes), if any
        request_id = state.setdefault("request_id", "req_" + uuid.uuid4().hex)

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


def _token(header: str, api: bool) -> str:
    """The key in an ``Authorization`` header: a bearer token, or, outside the API (``/v1``), a
    Basic password (what a browser sends for ``/ui`` and the docs pages after its login prompt)."""
    scheme, _, value = header.partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "bearer":
        return value
    if scheme == "basic" and not api:
        try:
            return base64.b64decode(value, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return ""
    return ""


class ApiKeyMiddleware:
    """Require the key on every HTTP path but ``PROBE_PATHS`` (and ``METRICS_AND_UI_PATHS`` unless
    protected) when keys are set. WebSockets check their own key (``routes_realtime``).

    ``keys`` and ``protect_metrics_and_ui`` are called per request so a reconfigured app picks up
    new values. Keys are compared in constant time against each.
    """

    def __init__(self, app: ASGIApp, keys: Callable[[], Sequence[str]],
                 protect_metrics_and_ui: Callable[[], bool] = lambda: False):
        self.app, self.keys, self.protect = app, keys, protect_metrics_and_ui

    def _open(self, scope: Scope) -> bool:
        path = scope["path"]
        if path in PROBE_PATHS or scope.get("method") == "OPTIONS":  # probes, CORS preflights
            return True
        return path in METRICS_AND_UI_PATHS and not self.protect()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = self.keys() if scope["type"] == "http" else ()
        if not keys or self._open(scope):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        api = (path + "/").startswith("/v1/")
        token = _token(Headers(scope=scope).get("authorization", ""), api)
        if not token:
            error = OpenAIError(401, MISSING_KEY_MESSAGE)
        elif key_accepted(token, keys):
            await self.app(scope, receive, send)
            return
        else:
            error = OpenAIError(401, f"Incorrect API key provided: {_mask(token)}.", code="invalid_api_key")
        if not api:
            # pages (/ui, the docs): the browser asks for the key (any user name); never on /v1, where
            # a prompt would pop up over the /ui page's own calls
            error.headers["www-authenticate"] = 'Basic realm="open-stt"'
        log.info("rejected unauthenticated %s %s", scope.get("method"), path)
        await error.response()(scope, receive, send)
