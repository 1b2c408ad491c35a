"""OpenAI's audio routes: ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``.

A request is admitted (``Limits``: a slot, or 429), its form parsed (``forms.py``) into its
options (``request_options.py``), its model leased from the registry, its audio decoded, and its
transcription run in the engine (the window loop here, the windows decoded by the model service),
with diarization alongside (``speakers.py``); the answer is rendered in the requested format, or
streamed as server-sent events (``streaming.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from openstt.api.audio_openapi import audio_openapi
from openstt.api.errors import OpenAIError, bad_request, model_failure, openai_error, request_id_of
from openstt.api.forms import AudioRequest, parse_audio_form, read_form
from openstt.api.limits import (
    BYTES_PER_SECOND,
    CLIENT_CLOSED_REQUEST,
    BudgetExhausted,
    ClientDisconnected,
    Limits,
    Slot,
    SlotStreamingResponse,
    unless_disconnected,
)
from openstt.api.request_options import SEGMENT_TIMED, check_capabilities, transcribe_options
from openstt.api.runs import deadline_error, held_to_speech, log_done, stop_run, tracked
from openstt.api.speakers import reference_voices, start_diarization
from openstt.api.state import app_state
from openstt.api.streaming import stream_events
from openstt.audio import SAMPLE_RATE, AudioError, decode_audio, probe_seconds
from openstt.diarization.attribution import attribute
from openstt.engines.base import TranscriptionRun, UnsupportedRequest
from openstt.errors import OpenSTTError
from openstt.formats import render
from openstt.messages import ModelFailure
from openstt.metrics import metrics
from openstt.registry import ModelRegistry
from openstt.speech_times import speech_spans
from openstt.transcript import Transcript
from openstt.vad import speech_probabilities

log = logging.getLogger("openstt.api")

router = APIRouter()


def _client_error(exc: Exception) -> OpenAIError:
    err = bad_request(exc.message, param=exc.param, code=exc.code)
    err.reason = exc.code or ("invalid_file_format" if isinstance(exc, AudioError) else "unsupported_request")
    return err


def _busy(route: str, reason: str, message: str, status: int = 429, retry_after: int = 2) -> OpenAIError:
    metrics().requests.labels(route, "unknown", str(status)).inc()
    metrics().failures.labels(route, reason).inc()
    # Shed load instead of queueing without bound; the SDK waits for Retry-After and retries.
    return OpenAIError(status, message, type="rate_limit_error" if status == 429 else "server_error",
                       code=reason, headers={"retry-after": str(retry_after)})


async def _transcribe(request: Request, task: str) -> Response:
    registry = app_state(request.app).serving_registry()
    limits: Limits = app_state(request.app).limits
    route = "transcriptions" if task == "transcribe" else "translations"
    slot = limits.try_upload(route, request.scope.get("state", {}).get("body"))
    if slot is None:
        raise _busy(route, "rate_limit_exceeded", f"The server is busy ({limits.max_uploads} uploads in progress). "
                    "Retry shortly.")
    slot.request_id = request_id_of(request)
    try:
        response = await _transcribe_admitted(request, registry, limits, task, slot)
    except ClientDisconnected:
        slot.cancel()
        slot.release()
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # for the access log: the server drops it
    except (OpenAIError, OpenSTTError) as exc:  # the handler answers a domain error the same way
        err = openai_error(exc, slot.request_id)
        slot.fail(err.status, err.reason)
        slot.release()
        raise
    except BaseException:
        slot.fail(500, "internal_error")
        slot.release()
        raise
    if not isinstance(response, StreamingResponse):
        slot.release()  # a stream releases its slot when it ends
    return response


async def _decode(req: AudioRequest, limits: Limits, slot: Slot) -> np.ndarray:
    """The upload's audio, decoded in a worker thread once the process's decoded-audio budget has
    room for its declared length (``slot`` holds the bytes until the request ends)."""
    # what the header declares; what decoding would refuse from it (too long, too many channels) is a 400 now
    declared = await run_in_threadpool(probe_seconds, req.file.file, max_duration=limits.max_audio_seconds)
    seconds = min(declared if declared is not None else limits.max_audio_seconds, limits.max_audio_seconds)
    try:
        slot.audio_bytes = await limits.audio.take(int(seconds * BYTES_PER_SECOND))
    except BudgetExhausted:
        raise _busy(slot.route, "server_busy", "The server is busy: the audio of the requests in progress fills "
                    "its memory budget. Retry shortly.", status=503, retry_after=5) from None
    audio = await run_in_threadpool(decode_audio, req.file.file, max_duration=limits.max_audio_seconds)
    extra = audio.nbytes - slot.audio_bytes  # a declared length is only a hint: account for what is held
    if extra > 0:
        limits.audio.force(extra)
    else:
        limits.audio.give_back(-extra)
    slot.audio_bytes = audio.nbytes
    return audio


async def _transcribe_admitted(request: Request, registry: ModelRegistry, limits: Limits, task: str,
                               slot: Slot) -> Response:
    req: AudioRequest = parse_audio_form(await read_form(request), task=task)
    lease = registry.acquire(req.model)  # in use (not idle, drained before an unload) until the slot ends
    slot.on_release(lease.release)
    engine = lease.engine
    slot.model = engine.name
    state = app_state(request.app)
    check_capabilities(req, engine, state.diarization)
    request_id = request_id_of(request)
    started = time.perf_counter()
    speakers: asyncio.Task | None = None
    try:
        # Decoding and inference run in worker threads so the event loop (and /health) stay free.
        references = await run_in_threadpool(reference_voices, req)
        audio = await _decode(req, limits, slot)
        slot.audio_seconds = len(audio) / SAMPLE_RATE
        # Only now, with the upload read and decoded, does the request take a transcription slot.
        if not limits.try_admit(slot):
            raise _busy(slot.route, "rate_limit_exceeded", f"The server is busy ({limits.max_in_flight} "
                        "transcriptions in progress). Retry shortly.")
        # the server's default beam size is Whisper's; other families decode without beams
        beam_size = state.beam_size if engine.spec.family == "whisper" else 1
        options = transcribe_options(req, state.long_form, beam_size,
                                     word_timestamps=req.diarized and engine.supports_word_timestamps)
        timed = req.diarized or options.word_timestamps or req.response_format in SEGMENT_TIMED
        if timed:
            # one VAD pass for all: the diarization's speech regions, the transcription's chunks and
            # where its words and segments may be
            probabilities = await run_in_threadpool(speech_probabilities, audio)
            options = dataclasses.replace(options, speech_probabilities=probabilities)
        if req.diarized:
            speakers = start_diarization(request, req, audio, references, probabilities)
            slot.on_release(speakers.cancel)
        run = await run_in_threadpool(engine.start, audio, options)
        if timed:
            run = held_to_speech(run, speech_spans(probabilities, len(audio)))
    except (AudioError, UnsupportedRequest) as exc:
        raise _client_error(exc) from None
    finally:
        await req.file.close()

    if req.stream:
        events = stream_events(run, req, engine.name, request_id, started, limits, slot, speakers)
        return SlotStreamingResponse(events, slot=slot, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        collect = asyncio.wait_for(_collect(run, slot, speakers), timeout=limits.request_timeout)
        # The form has been read, so the next message from the client can only be its disconnect.
        transcript = await unless_disconnected(collect, request.receive)
    except asyncio.TimeoutError:
        raise deadline_error(limits) from None
    except ModelFailure as exc:
        log.error("%s %s", request_id, exc)
        raise model_failure(exc, request_id, engine.name) from None
    finally:
        await stop_run(run)
    log_done(request_id, req, engine.name, transcript.duration, started)
    return render(transcript, req.response_format, task=task, granularities=req.timestamp_granularities,
                  logprobs="logprobs" in req.include, model=engine.name)


async def _collect(run: TranscriptionRun, slot: Slot, speakers: asyncio.Task | None) -> Transcript:
    """The whole transcript; with ``speakers`` (diarization running alongside), each segment
    attributed to its speaker and split where the speaker changes."""
    transcript = await tracked(run, slot).acollect()
    if speakers is not None:
        transcript.segments = attribute(transcript.segments, await speakers)
    return transcript


@router.post("/v1/audio/transcriptions", openapi_extra=audio_openapi("transcribe"))
async def transcriptions(request: Request) -> Response:
    return await _transcribe(request, "transcribe")


@router.post("/v1/audio/translations", openapi_extra=audio_openapi("translate"))
async def translations(request: Request) -> Response:
    return await _transcribe(request, "translate")
