"""Limits on reading a request body: its size, and how slowly it may arrive.

A body over ``max_bytes`` gets OpenAI's 413 before the multipart form is parsed
(``Content-Length`` up front; chunked uploads counted as they stream in). And since uvicorn, like
Starlette, waits for body bytes forever, a client that sends slowly or stops could hold the
server's resources: after a grace period the body must average a minimum transfer rate, and be
complete within an overall limit, or the client gets 408. Either way the app then sees a
disconnect: its handler stops reading, releases what it held, and the connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openstt.api.errors import OpenAIError
from openstt.settings import UPLOAD_GRACE_S, UPLOAD_MIN_BYTES_PER_S, UPLOAD_TIMEOUT_S

log = logging.getLogger("openstt.api")


@dataclass(frozen=True)
class BodyDeadline:
    min_rate: int = UPLOAD_MIN_BYTES_PER_S  # bytes/s averaged since the request began; 0: none
    grace: float = UPLOAD_GRACE_S  # seconds before the rate counts (connection set-up, slow start)
    timeout: float = UPLOAD_TIMEOUT_S  # the whole body

    def due(self, started: float, received: int) -> float:
        """When the next body bytes must have arrived (monotonic time)."""
        limit = started + self.timeout
        if self.min_rate:
            limit = min(limit, started + self.grace + received / self.min_rate)
        return limit


class BodyProgress:
    """How one request's body is arriving (``scope["state"]["body"]``): when bytes last came, and a
    way to stop waiting for the rest (``evict``: the place it holds is wanted by another client)."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.complete = False
        self.evicted = False
        self._waiting: asyncio.Timeout | None = None

    def idle(self) -> float:
        """Seconds since its last bytes; 0 once the body is complete."""
        return 0.0 if self.complete else time.monotonic() - self.last

    def evict(self) -> None:
        self.evicted = True
        if self._waiting is not None:
            self._waiting.reschedule(asyncio.get_running_loop().time())  # the pending read ends now


class BodyLimitsMiddleware:
    """Apply ``max_bytes()`` (0: no limit) and ``deadline()`` to the body of every HTTP request."""

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int], deadline: Callable[[], BodyDeadline]):
        self.app, self.max_bytes, self.deadline = app, max_bytes, deadline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, deadline = self.max_bytes(), self.deadline()
        declared = Headers(scope=scope).get("content-length")
        if limit and declared and declared.isdigit() and int(declared) > limit:
            await _too_large(limit, int(declared)).response()(scope, receive, send)
            return
        started = time.monotonic()
        progress = scope.setdefault("state", {})["body"] = BodyProgress()
        received, refused, response_started = 0, False, False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            if progress.complete:  # what comes now is the disconnect, whenever
                return await receive()
            try:
                if progress.evicted:
                    raise TimeoutError
                async with asyncio.timeout(max(deadline.due(started, received) - time.monotonic(), 0)) as waiting:
                    progress._waiting = waiting
                    message = await receive()
            except TimeoutError:
                elapsed = time.monotonic() - started
                log.info("closed %s %s: request body %s (%d bytes in %.1f s)", scope.get("method"), scope["path"],
                         "stalled while others waited" if progress.evicted else "too slow", received, elapsed)
                return await refuse(_too_slow(deadline, received, elapsed, progress))
            finally:
                progress._waiting = None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                progress.last, progress.complete = time.monotonic(), not message.get("more_body", False)
                if limit and received > limit:
                    return await refuse(_too_large(limit, received))
            return message

        async def refuse(error: OpenAIError) -> Message:
            nonlocal refused
            refused = True
            if not response_started:
                await error.response()(scope, receive, guarded_send)
            return {"type": "http.disconnect"}

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        async def app_send(message: Message) -> None:
            if refused:
                return  # the 413 or 408 already answered this request
            await guarded_send(message)

        await self.app(scope, limited_receive, app_send)


def _too_large(limit: int, read: int) -> OpenAIError:
    return OpenAIError(413, f"Maximum content size limit ({limit}) exceeded ({read} bytes read)", type="server_error")


def _too_slow(deadline: BodyDeadline, received: int, elapsed: float, progress: BodyProgress) -> OpenAIError:
    if progress.evicted:
        why = (f"the request body stalled ({progress.idle():.1f} s without data) while other clients waited "
               "for an upload place")
    elif elapsed >= deadline.timeout - 0.01:
        why = f"the request body was not complete within {deadline.timeout:g} s"
    else:
        why = (f"the request body arrived slower than {deadline.min_rate} bytes/s "
               f"({received} bytes in {elapsed:.1f} s)")
    # 408: the SDK retries it, which is right for a transfer that stalled on the way
    return OpenAIError(408, f"Request timeout: {why}.", type="invalid_request_error", code="request_timeout",
                       headers={"connection": "close"})
