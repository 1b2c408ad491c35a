"""Live transcription: OpenAI's Realtime transcription sessions on ``WebSocket /v1/realtime``
(the SDK's ``client.realtime.connect(extra_query={"intent": "transcription"})``).

The route authenticates (``Authorization: Bearer``, or for browsers the subprotocol
``openai-insecure-api-key.<key>``), admits the session (``LiveLimits``), and feeds client events to
a ``LiveSession`` (``openstt.live.session``), which decodes through the same engines, and so the
same batching model service, as file requests, with priority (``WindowJob.live``). Whatever goes
wrong is an ``error`` event; only auth, admission and the session's limits close the socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from openstt.api.limits import LiveLimits
from openstt.api.middleware import MISSING_KEY_MESSAGE, key_accepted
from openstt.api.state import app_state
from openstt.live.protocol import ProtocolError, Transcription, error_event
from openstt.live.session import LiveSession
from openstt.live.transcriber import ModelTranscriber

log = logging.getLogger("openstt.live")

router = APIRouter()

KEY_PROTOCOL = "openai-insecure-api-key."  # how browsers (which cannot set headers) send the key
# Close codes (RFC 6455): policy violation (auth, not a transcription session, live transcription
# off), try again later (capacity, models loading), normal (session expired or idle).
POLICY_VIOLATION, TRY_AGAIN_LATER, NORMAL, SERVICE_RESTART = 1008, 1013, 1000, 1012
FINISH_SECONDS = 10.0  # at the end of a session, how long committed turns may take to complete
# A client that reads no event for this long is gone as far as the session is concerned: its
# socket's buffers are full, and the session's work would only pile up behind it.
SEND_TIMEOUT_S = 30.0
INLINE_JSON_BYTES = 64 * 1024  # larger events (appends of up to 15 MiB) are parsed off the event loop


def _offered_key(ws: WebSocket) -> tuple[str | None, list[str]]:
    """The API key the client sent (header, or browser subprotocol) and its other subprotocols."""
    protocols = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    scheme, _, token = ws.headers.get("authorization", "").partition(" ")
    key = token.strip() if scheme.lower() == "bearer" and token.strip() else None
    for p in protocols:
        if p.startswith(KEY_PROTOCOL) and key is None:
            key = p[len(KEY_PROTOCOL):]
    return key, [p for p in protocols if not p.startswith(KEY_PROTOCOL)]


def _refusal(ws: WebSocket) -> tuple[dict, int] | None:
    """Why this connection may not open a session (an error event and a close code), if it may not."""
    state = app_state(ws.app)
    keys = state.api_keys
    if keys:
        key, _ = _offered_key(ws)
        if key is None:
            return error_event(MISSING_KEY_MESSAGE, code="missing_api_key"), POLICY_VIOLATION
        if not key_accepted(key, keys):
            return error_event("Incorrect API key provided.", code="invalid_api_key"), POLICY_VIOLATION
    intent = ws.query_params.get("intent")
    if intent not in (None, "transcription"):
        return error_event(f"This server serves transcription sessions only; connect with ?intent=transcription "
                           f"(got intent={intent!r}).", code="unsupported_value", param="intent"), POLICY_VIOLATION
    if state.live_limits.max_sessions == 0:
        return error_event("Live transcription is turned off on this server (OPEN_STT_MAX_LIVE_SESSIONS=0).",
                           code="unsupported_value"), POLICY_VIOLATION
    if state.registry is None:
        return error_event("The server is still loading its models; retry shortly.", type="server_error",
                           code="models_loading"), TRY_AGAIN_LATER
    if state.live_limits.draining:
        return error_event("The server is shutting down; reconnect to open a session elsewhere.",
                           type="server_error", code="server_shutting_down"), SERVICE_RESTART
    return None


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket) -> None:
    _, protocols = _offered_key(ws)
    # a browser that offers subprotocols fails the connection unless the server picks one
    await ws.accept(subprotocol="realtime" if "realtime" in protocols else (protocols[0] if protocols else None))
    refusal = _refusal(ws)
    limits: LiveLimits = app_state(ws.app).live_limits
    if refusal is None and not limits.try_open():
        refusal = (error_event(f"The server is busy ({limits.max_sessions} live sessions open). Retry shortly.",
                               type="rate_limit_error", code="rate_limit_exceeded"), TRY_AGAIN_LATER)
    if refusal is not None:
        message, code = refusal
        log.info("refused live session: %s", message["error"]["code"])
        await _send(ws, message)
        await ws.close(code)
        return
    try:
        await _serve(ws, limits)
    finally:
        limits.close()


async def _send(ws: WebSocket, message: dict) -> bool:
    """Send one event; False once the client has gone."""
    if ws.application_state != WebSocketState.CONNECTED or ws.client_state != WebSocketState.CONNECTED:
        return False
    try:
        await ws.send_text(json.dumps(message))
        return True
    except (WebSocketDisconnect, RuntimeError, OSError):
        return False


async def _serve(ws: WebSocket, limits: LiveLimits) -> None:
    state = app_state(ws.app)
    lock = asyncio.Lock()
    gone = asyncio.Event()  # the client stopped reading

    async def send(message: dict) -> None:
        if gone.is_set():
            return
        async with lock:  # events from the receive loop and from decodes, one at a time
            try:
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    await _send(ws, message)
            except TimeoutError:
                gone.set()

    session = LiveSession(send, ModelTranscriber(state.serving_registry(), limits.decodes), limits.bounds(),
                          limits.previews, budget=limits.audio)
    drain = limits.sessions[session] = asyncio.Event()
    requested = ws.query_params.get("model")  # the SDK's connect(model=...): a served model starts the session on it
    if requested:
        try:
            session.transcriber.check(Transcription(model=requested))
            session.config = dataclasses.replace(session.config, transcription=Transcription(model=requested))
        except ProtocolError:
            pass  # e.g. an OpenAI realtime model name: the session's own settings decide
    started = time.monotonic()
    deadline = started + limits.max_session_seconds
    messages, ending = 0, "client closed"
    log.info("live session %s opened (%d open)", session.id, limits.open)
    stops = (asyncio.ensure_future(drain.wait()), asyncio.ensure_future(gone.wait()))
    try:
        await session.start()
        while True:
            remaining = deadline - time.monotonic()
            receive = asyncio.ensure_future(ws.receive())
            done, _ = await asyncio.wait((receive, *stops), timeout=max(0.0, min(limits.idle_timeout, remaining)),
                                         return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:
                receive.cancel()
                if gone.is_set():
                    ending = "client stopped reading"
                    await ws.close(POLICY_VIOLATION)
                    return
                if drain.is_set():  # shutting down: committed turns complete, then the client reconnects
                    ending = "server shutting down"
                    await session.finish(FINISH_SECONDS)
                    await ws.close(SERVICE_RESTART)
                    return
                expired = time.monotonic() >= deadline
                ending = "expired" if expired else "idle"
                text = (f"Your session hit the maximum duration of {limits.max_session_seconds:g} seconds."
                        if expired else f"No events from the client for {limits.idle_timeout:g} seconds.")
                await send(error_event(text, code="session_expired" if expired else "session_idle_timeout"))
                await session.finish(FINISH_SECONDS)
                await ws.close(NORMAL)
                return
            message = receive.result()
            if message["type"] == "websocket.disconnect":
                return
            messages += 1
            await _dispatch(session, send, message, limits.max_message_bytes)
    except (WebSocketDisconnect, RuntimeError, OSError):  # RuntimeError: closing a socket already closed
        pass
    finally:
        for stop in stops:
            stop.cancel()
        limits.sessions.pop(session, None)
        await session.close()  # whatever is queued or decoding for it stops now
        log.info("live session %s closed (%s) after %.1f s, %d events", session.id, ending,
                 time.monotonic() - started, messages)


async def drain_sessions(limits: LiveLimits, timeout: float = FINISH_SECONDS + 5) -> None:
    """On shutdown: refuse new sessions; let each open one complete its committed turns (sending
    ``completed`` or ``failed``) and close with 1012, so its client reconnects elsewhere."""
    limits.draining = True
    if not limits.sessions:
        return
    log.info("shutting down: finishing the committed turns of %d live session(s)", len(limits.sessions))
    for drain in limits.sessions.values():
        drain.set()
    deadline = time.monotonic() + timeout
    while limits.sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _dispatch(session: LiveSession, send, message: dict, max_bytes: int) -> None:
    raw = message.get("text")
    if raw is None:
        await send(error_event("Binary frames are not supported; send JSON events as text frames.",
                               code="invalid_value"))
        return
    if len(raw) > max_bytes:
        await send(error_event(f"The event is {len(raw)} bytes; the largest accepted is {max_bytes} bytes. Send "
                               "audio in smaller appends.", code="message_too_large"))
        return
    try:
        event = json.loads(raw) if len(raw) < INLINE_JSON_BYTES else await asyncio.to_thread(json.loads, raw)
    except (ValueError, RecursionError):
        await send(error_event("The event is not valid JSON.", code="invalid_json"))
        return
    if not isinstance(event, dict):
        await send(error_event("An event must be a JSON object with a 'type'.", code="invalid_value", param="type"))
        return
    await session.handle(event)
