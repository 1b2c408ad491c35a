"""Admission control for transcriptions: how many may upload and run at once, how long they may
take, how long their audio may be, how much decoded audio the process holds (``AudioBudget``), the
per-request slot that also records the request's metrics, and stopping the work of a request whose
client has disconnected.

A request is counted as an upload while its body is read and its audio decoded, and takes one of
the ``max_in_flight`` transcription slots only then: a client that sends slowly (or stops) holds
an upload place, never a transcription slot, until the body deadline closes it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi.responses import StreamingResponse
from starlette.types import Message, Receive

from openstt.api.body_limits import BodyDeadline, BodyProgress
from openstt.metrics import metrics
from openstt.settings import (
    AUDIO_BUDGET_WAIT_S,
    CPU_BATCH_WINDOWS,
    CPU_LIVE_INTERIM_DECODES,
    LIVE_IDLE_TIMEOUT_S,
    LIVE_MAX_BUFFER_SECONDS,
    LIVE_MAX_MESSAGE_BYTES,
    LIVE_MAX_PENDING_TURNS,
    LIVE_MAX_SESSION_SECONDS,
    LIVE_MAX_SPEED,
    MAX_AUDIO_SECONDS,
    MAX_CONCURRENT_REQUESTS,
    MAX_LIVE_SESSIONS,
    MAX_UPLOADS_IN_PROGRESS,
    REQUEST_TIMEOUT_S,
)

log = logging.getLogger("openstt.api")
T = TypeVar("T")

# An upload that has sent nothing for this long may be closed when another client needs its place
# (a client on a poor link pauses for a second, not for two).
STALLED_S = 2.0
# How long a stream's event may wait for its client to read (the socket's buffers being full).
STREAM_SEND_TIMEOUT_S = 30.0
# nginx's "client closed request": recorded for requests whose client went away, never sent.
CLIENT_CLOSED_REQUEST = 499


BYTES_PER_SECOND = 4 * 16000  # decoded audio: 16 kHz float32


class AudioBudget:
    """Bytes of decoded audio that the process's requests and live sessions hold at once.

    A request reserves its audio's declared length before decoding it; if that does not fit, it
    waits (first come, first served) up to ``wait`` s for others to give theirs back, then is
    refused. Amounts above the whole budget are clamped to it: such audio runs, alone. Used from
    the event loop only."""

    def __init__(self, capacity: int, wait: float = AUDIO_BUDGET_WAIT_S):
        self.capacity, self.wait, self.used = capacity, wait, 0
        self._waiters: list[tuple[int, asyncio.Future]] = []

    def try_take(self, amount: int) -> bool:
        """Take ``amount`` bytes now if they fit (and nobody waits before), else take nothing."""
        amount = min(amount, self.capacity)
        if self._waiters or self.used + amount > self.capacity:
            return False
        self.used += amount
        return True

    def force(self, amount: int) -> None:
        """Take ``amount`` bytes whatever is left: what admitted work turned out to need."""
        self.used += amount

    async def take(self, amount: int) -> int:
        """Reserve ``amount`` bytes (clamped to the budget), waiting up to ``wait`` s; returns the
        bytes taken (give them back with ``give_back``), or raises ``BudgetExhausted``."""
        amount = min(amount, self.capacity)
        if self.try_take(amount):
            return amount
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((amount, waiter))
        try:
            await asyncio.wait_for(waiter, self.wait)
        except BaseException as exc:  # timed out, or the request was cancelled while it waited
            if waiter.done() and not waiter.cancelled():
                self.give_back(amount)  # granted just as it stopped waiting
            self._waiters = [w for w in self._waiters if w[1] is not waiter]
            self._wake()
            if isinstance(exc, asyncio.TimeoutError):
                raise BudgetExhausted(self) from None
            raise
        return amount

    def give_back(self, amount: int) -> None:
        self.used = max(self.used - amount, 0)
        self._wake()

    def _wake(self) -> None:
        # in order: the first waiter that does not fit holds back those after it (no starvation)
        while self._waiters:
            amount, waiter = self._waiters[0]
            if waiter.done():
                self._waiters.pop(0)
                continue
            if self.used + amount > self.capacity:
                return
            self._waiters.pop(0)
            self.used += amount
            waiter.set_result(None)


class BudgetExhausted(Exception):
    """The decoded-audio budget stayed full for as long as a request may wait."""

    def __init__(self, budget: AudioBudget):
        super().__init__(f"decoded audio budget full ({budget.used} of {budget.capacity} bytes)")


@dataclass
class Limits:
    """Per-process admission control and deadlines for transcriptions."""

    max_in_flight: int = MAX_CONCURRENT_REQUESTS
    max_audio_seconds: float = MAX_AUDIO_SECONDS
    request_timeout: float = REQUEST_TIMEOUT_S
    max_uploads: int = MAX_UPLOADS_IN_PROGRESS  # bodies being read and decoded (no slot held yet)
    audio: AudioBudget = field(default_factory=lambda: AudioBudget(default_audio_budget()))
    body: BodyDeadline = field(default_factory=BodyDeadline)  # how slowly a request body may arrive
    in_flight: int = 0
    uploads: set = field(default_factory=set)  # slots reading or decoding their upload

    @property
    def uploading(self) -> int:
        return len(self.uploads)

    def try_upload(self, route: str, body: BodyProgress | None = None) -> Slot | None:
        """A place for one request to upload and decode its audio (``body``: how its body is
        arriving). When all are taken, the upload that has sent nothing for longest, if that is
        ``STALLED_S`` or more, is closed (408) to make room; else None."""
        if self.uploading >= self.max_uploads:
            stalled = max(self.uploads, key=lambda s: s.body.idle() if s.body else 0.0, default=None)
            if stalled is None or stalled.body is None or stalled.body.idle() < STALLED_S:
                return None
            stalled.body.evict()
            self.uploads.discard(stalled)  # its place is free now; its handler ends on the 408
        slot = Slot(self, route)
        slot.body = body
        self.uploads.add(slot)  # single-threaded event loop: no lock needed
        return slot

    def try_admit(self, slot: Slot) -> bool:
        """Move ``slot`` from uploading to transcribing, if a transcription slot is free."""
        if self.in_flight >= self.max_in_flight:
            return False
        self.uploads.discard(slot)
        self.in_flight += 1
        slot.admitted = True
        metrics().in_flight.labels(slot.route).inc()
        return True


def default_audio_budget() -> int:
    """An eighth of the machine's (or container's) memory, within 0.5 to 4 GiB: 3 GiB on a
    24 GB machine, about 14 hours of decoded audio held at once."""
    from openstt.memory import system_memory

    total, _ = system_memory()
    return int(min(max(total // 8, 512 << 20), 4 << 30))


@dataclass
class LiveLimits:
    """Per-process limits of live transcription sessions (WebSocket ``/v1/realtime``)."""

    max_sessions: int = MAX_LIVE_SESSIONS  # 0: live transcription is off
    max_session_seconds: float = LIVE_MAX_SESSION_SECONDS
    max_buffer_seconds: float = LIVE_MAX_BUFFER_SECONDS  # uncommitted audio held at once
    max_message_bytes: int = LIVE_MAX_MESSAGE_BYTES
    idle_timeout: float = LIVE_IDLE_TIMEOUT_S  # seconds without any client message
    max_interim_decodes: int = CPU_LIVE_INTERIM_DECODES  # previews of all sessions in flight at once
    max_speed: float = LIVE_MAX_SPEED  # audio received per second of session, after a burst
    max_pending_turns: int = LIVE_MAX_PENDING_TURNS  # per session, committed and not yet transcribed
    max_queued_decodes: int = CPU_BATCH_WINDOWS  # final decodes of all sessions in the model service at once
    audio: AudioBudget | None = None  # the process's decoded-audio budget (shared with Limits)
    open: int = 0
    draining: bool = False  # shutting down: no new sessions, open ones finish their turns and close

    def __post_init__(self):
        from openstt.live.session import PreviewBudget

        self.previews = PreviewBudget(self.max_interim_decodes)
        self.decodes = asyncio.Semaphore(self.max_queued_decodes)
        self.sessions: dict[object, asyncio.Event] = {}  # open sessions, and the event that drains each

    def bounds(self):
        from openstt.live.session import SessionBounds

        return SessionBounds(max_buffer_seconds=self.max_buffer_seconds, max_speed=self.max_speed,
                             max_pending_turns=self.max_pending_turns)

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
        self.limits, self.route, self.released, self.admitted = limits, route, False, False
        self.started = time.perf_counter()
        self.model, self.status, self.audio_seconds, self.reason = "unknown", 200, 0.0, None
        self.request_id: str | None = None
        self.progress = 0.0  # seconds of audio decoded so far (end of the last segment)
        self._on_release: list = []
        self.audio_bytes = 0  # of the process's AudioBudget, held until released
        self.body: BodyProgress | None = None  # how its request body is arriving (while uploading)

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
        m, elapsed = metrics(), time.perf_counter() - self.started
        if self.admitted:
            self.limits.in_flight -= 1
            m.in_flight.labels(self.route).dec()
        else:
            self.limits.uploads.discard(self)
        self.limits.audio.give_back(self.audio_bytes)
        for callback in self._on_release:
            callback()
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
        async def bounded_send(message: Message) -> None:
            # a client that stops reading fills the socket's buffers, and then a send waits for it
            try:
                async with asyncio.timeout(STREAM_SEND_TIMEOUT_S):
                    await send(message)
            except TimeoutError:
                log.info("%s stream stopped: the client read nothing for %g s", self.slot.request_id,
                         STREAM_SEND_TIMEOUT_S)
                raise ClientDisconnected from None

        try:
            await unless_disconnected(self.stream_response(bounded_send), receive)
        except (ClientDisconnected, OSError):  # OSError: a spec 2.4 server's send to a closed connection
            self.slot.cancel()
        finally:
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()  # closes the window loop now, not whenever it is garbage-collected
            finally:
                self.slot.release()
