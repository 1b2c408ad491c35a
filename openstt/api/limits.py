"""Admission control for transcriptions: how many may run at once, how long they may take, how
long their audio may be, the per-request slot that also records the request's metrics, and
stopping the work of a request whose client has disconnected."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from fastapi.responses import StreamingResponse
from starlette.types import Receive

from openstt.metrics import metrics
from openstt.settings import (
    CPU_LIVE_INTERIM_DECODES,
    LIVE_IDLE_TIMEOUT_S,
    LIVE_MAX_BUFFER_SECONDS,
    LIVE_MAX_MESSAGE_BYTES,
    LIVE_MAX_SESSION_SECONDS,
    MAX_AUDIO_SECONDS,
    MAX_CONCURRENT_REQUESTS,
    MAX_LIVE_SESSIONS,
    REQUEST_TIMEOUT_S,
)

log = logging.getLogger("openstt.api")
T = TypeVar("T")

# nginx's "client closed request": recorded for requests whose client went away, never sent.
CLIENT_CLOSED_REQUEST = 499


@dataclass
class Limits:
    """Per-process admission control and deadlines for transcriptions."""

    max_in_flight: int = MAX_CONCURRENT_REQUESTS
    max_audio_seconds: float = MAX_AUDIO_SECONDS
    request_timeout: float = REQUEST_TIMEOUT_S
    in_flight: int = 0

    def try_acquire(self, route: str) -> Slot | None:
        if self.in_flight >= self.max_in_flight:
            return None
        self.in_flight += 1  # single-threaded event loop: no lock needed
        return Slot(self, route)


@dataclass
class LiveLimits:
    """Per-process limits of live transcription sessions (WebSocket ``/v1/realtime``)."""

    max_sessions: int = MAX_LIVE_SESSIONS  # 0: live transcription is off
    max_session_seconds: float = LIVE_MAX_SESSION_SECONDS
    max_buffer_seconds: float = LIVE_MAX_BUFFER_SECONDS  # uncommitted audio held at once
    max_message_bytes: int = LIVE_MAX_MESSAGE_BYTES
    idle_timeout: float = LIVE_IDLE_TIMEOUT_S  # seconds without any client message
    max_interim_decodes: int = CPU_LIVE_INTERIM_DECODES  # previews of all sessions in flight at once
    open: int = 0

    def __post_init__(self):
        from openstt.live.session import PreviewBudget

        self.previews = PreviewBudget(self.max_interim_decodes)

    def try_open(self) -> bool:
        if self.open >= self.max_sessions:
            return False
        self.open += 1  # single-threaded event loop: no lock needed
        metrics().live_sessions.inc()
        return True

    def close(self) -> None:
        self.open -= 1
        metrics().live_sessions.dec()


class Slot:
    """One admitted transcription, and what is learnt about it for the metrics. Released exactly
    once, however the request ends (releasing twice is harmless)."""

    def __init__(self, limits: Limits, route: str):
        self.limits, self.route, self.released = limits, route, False
        self.started = time.perf_counter()
        self.model, self.status, self.audio_seconds, self.reason = "unknown", 200, 0.0, None
        self.request_id: str | None = None
        self.progress = 0.0  # seconds of audio decoded so far (end of the last segment)
        self._on_release: list = []
        metrics().in_flight.labels(route).inc()

    def on_release(self, callback) -> None:
        """Call ``callback()`` when the request ends (e.g. to release its model lease)."""
        self._on_release.append(callback)

    def fail(self, status: int, reason: str | None) -> None:
        self.status, self.reason = status, reason or "error"

    def cancel(self) -> None:
        """The client went away before its response: recorded as 499, counted and logged as cancelled."""
        self.fail(CLIENT_CLOSED_REQUEST, "client_disconnected")

    @property
    def cancelled(self) -> bool:
        return self.status == CLIENT_CLOSED_REQUEST

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.limits.in_flight -= 1
        for callback in self._on_release:
            callback()
        m, elapsed = metrics(), time.perf_counter() - self.started
        m.in_flight.labels(self.route).dec()
        m.requests.labels(self.route, self.model, str(self.status)).inc()
        m.latency.labels(self.route, self.model).observe(elapsed)
        if self.status == 200:
            m.audio_seconds.labels(self.route, self.model).inc(self.audio_seconds)
            m.processing_seconds.labels(self.route, self.model).inc(elapsed)
        if self.reason:
            m.failures.labels(self.route, self.reason).inc()
        if self.cancelled:
            m.cancelled.labels(self.route, self.model).inc()
            self._log_cancelled(elapsed)

    def _log_cancelled(self, elapsed: float) -> None:
        # how far it got and what it cost, never what was said
        log.info("%s %s cancelled: client disconnected model=%s audio=%.1fs of %.1fs took=%.2fs", self.request_id,
                 self.route, self.model, self.progress, self.audio_seconds, elapsed,
                 extra={"request_id": self.request_id, "route": self.route, "model": self.model,
                        "status": CLIENT_CLOSED_REQUEST, "audio_done_seconds": round(self.progress, 3),
                        "audio_seconds": round(self.audio_seconds, 3), "latency_seconds": round(elapsed, 3)})


class ClientDisconnected(Exception):
    """The client closed its connection while its request was being worked on."""


async def _disconnected(receive: Receive) -> None:
    """Returns once the client is gone. Only once the request body has been read: until then
    ``receive`` hands out the body (which this would swallow)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(work: Awaitable[T], receive: Receive) -> T:
    """Await ``work``, cancelling it (and raising ``ClientDisconnected``) if the client goes first.

    Nothing in Starlette stops a handler whose client left; without this, a request keeps
    sending windows to the model service for nobody until its audio is done."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    gone = False
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            gone = watch.exception() is None
            if not gone:  # cannot watch: finish unwatched
                log.debug("cannot watch for a disconnect: %r", watch.exception())
                await asyncio.wait((task,))
    finally:  # also when we are cancelled ourselves: neither task may outlive the request
        watch.cancel()
        task.cancel()  # a no-op once it is done
        await asyncio.wait((task, watch))
        if not watch.cancelled():
            watch.exception()  # retrieved, so never reported as unretrieved
    if gone:
        if not task.cancelled():
            task.exception()  # it ended otherwise while being cancelled: nobody wants its outcome now
        raise ClientDisconnected
    return task.result()


class SlotStreamingResponse(StreamingResponse):
    """Frees the request's slot however the stream ends, even if it never started, and stops the
    stream as soon as its client disconnects."""

    def __init__(self, *args, slot: Slot, **kwargs):
        super().__init__(*args, **kwargs)
        self.slot = slot

    async def __call__(self, scope, receive, send) -> None:
        # Starlette listens for the disconnect itself only under ASGI spec < 2.4 (uvicorn says 2.3),
        # and otherwise notices it at the next send, a whole window later: watch here, for any server.
        try:
            await unless_disconnected(self.stream_response(send), receive)
        except (ClientDisconnected, OSError):  # OSError: a spec 2.4 server's send to a closed connection
            self.slot.cancel()
        finally:
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()  # closes the window loop now, not whenever it is garbage-collected
            finally:
                self.slot.release()
