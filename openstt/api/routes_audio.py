"""OpenAI's audio routes: ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``.

A request is admitted (``Limits``: a slot, or 429), its form parsed (``forms.py``), its model
leased from the registry, its audio decoded, and its transcription run in the engine (the
window loop here, the windows decoded by the model service); the answer is rendered in the
requested format, or streamed as server-sent events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from openstt.api.errors import (
    OpenAIError,
    bad_request,
    internal_error,
    model_failure,
    openai_error,
    request_id_of,
)
from openstt.api.forms import AudioRequest, parse_audio_form, read_form
from openstt.api.limits import (
    CLIENT_CLOSED_REQUEST,
    ClientDisconnected,
    Limits,
    Slot,
    SlotStreamingResponse,
    unless_disconnected,
)
from openstt.api.state import app_state
from openstt.audio import SAMPLE_RATE, AudioError, decode_audio
from openstt.engines.base import Segment, TranscribeOptions, TranscriptionRun, UnsupportedRequest
from openstt.errors import OpenSTTError
from openstt.formats import delta_event, done_event, error_event, render, sse, token_usage
from openstt.metrics import metrics
from openstt.model_service import ModelFailure
from openstt.registry import ModelRegistry
from openstt.vad import VadOptions

log = logging.getLogger("openstt.api")

router = APIRouter()


def _check_capabilities(req: AudioRequest, engine) -> None:
    if req.response_format == "diarized_json":
        raise bad_request(
            f"response_format 'diarized_json' is not compatible with model '{req.model}'. "
            "Use 'json', 'text', 'srt', 'verbose_json' or 'vtt' instead.",
            param="response_format", code="unsupported_value",
        )
    if "logprobs" in req.include and not (req.response_format == "json" or req.stream):
        raise bad_request("logprobs are only available with response_format 'json' or with stream=true.",
                          param="include", code="unsupported_value")
    if (req.response_format == "verbose_json" and "word" in req.timestamp_granularities
            and not engine.supports_word_timestamps):
        raise bad_request(f"Model '{engine.name}' does not provide word timestamps.",
                          param="timestamp_granularities", code="unsupported_value")


def _vad(strategy: dict | str | None, long_form: str) -> VadOptions | None:
    """The VAD-chunked mode's settings for this request, or None for the sequential procedure:
    ``chunking_strategy`` when given (``none``: sequential), else the server's ``long_form``."""
    if strategy is None:
        return VadOptions() if long_form == "vad" else None
    return None if strategy == "none" else VadOptions.from_chunking_strategy(strategy)


def _options(req: AudioRequest, long_form: str = "sequential", beam_size: int = 1) -> TranscribeOptions:
    """The request's options; ``long_form`` and ``beam_size``: the server's defaults for what it omits."""
    return TranscribeOptions(
        task=req.task, language=req.language, languages=tuple(req.languages), prompt=req.prompt,
        keywords=tuple(req.keywords), temperature=req.temperature,
        beam_size=req.beam_size if req.beam_size is not None else beam_size,
        word_timestamps=req.response_format == "verbose_json" and "word" in req.timestamp_granularities,
        token_logprobs="logprobs" in req.include, vad=_vad(req.chunking_strategy, long_form),
    )


def _client_error(exc: Exception) -> OpenAIError:
    err = bad_request(exc.message, param=exc.param, code=exc.code)
    err.reason = exc.code or ("invalid_file_format" if isinstance(exc, AudioError) else "unsupported_request")
    return err


async def _transcribe(request: Request, task: str) -> Response:
    registry = app_state(request.app).serving_registry()
    limits: Limits = app_state(request.app).limits
    route = "transcriptions" if task == "transcribe" else "translations"
    slot = limits.try_acquire(route)
    if slot is None:
        metrics().requests.labels(route, "unknown", "429").inc()
        metrics().failures.labels(route, "rate_limit_exceeded").inc()
        # Shed load instead of queueing without bound; the SDK waits for Retry-After and retries.
        raise OpenAIError(429, f"The server is busy ({limits.max_in_flight} transcriptions in progress). "
                          "Retry shortly.", type="rate_limit_error", code="rate_limit_exceeded",
                          headers={"retry-after": "2"})
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


async def _transcribe_admitted(request: Request, registry: ModelRegistry, limits: Limits, task: str,
                               slot: Slot) -> Response:
    req: AudioRequest = parse_audio_form(await read_form(request), task=task)
    lease = registry.acquire(req.model)  # in use (not idle, drained before an unload) until the slot ends
    slot.on_release(lease.release)
    engine = lease.engine
    slot.model = engine.name
    _check_capabilities(req, engine)
    request_id = request_id_of(request)
    started = time.perf_counter()
    try:
        # Decoding and inference run in worker threads so the event loop (and /health) stay free.
        audio = await run_in_threadpool(decode_audio, req.file.file, max_duration=limits.max_audio_seconds)
        slot.audio_seconds = len(audio) / SAMPLE_RATE
        # the server's default beam size is Whisper's; other families decode without beams
        state = app_state(request.app)
        beam_size = state.beam_size if engine.spec.family == "whisper" else 1
        run = await run_in_threadpool(engine.start, audio, _options(req, state.long_form, beam_size))
    except (AudioError, UnsupportedRequest) as exc:
        raise _client_error(exc) from None
    finally:
        await req.file.close()

    if req.stream:
        events = _events(run, req, engine.name, request_id, started, limits, slot)
        return SlotStreamingResponse(events, slot=slot, media_type="text/event-stream",
                                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        collect = asyncio.wait_for(_tracked(run, slot).acollect(), timeout=limits.request_timeout)
        # The form has been read, so the next message from the client can only be its disconnect.
        transcript = await unless_disconnected(collect, request.receive)
    except asyncio.TimeoutError:
        # Deterministic for this audio: tell the SDK not to retry it.
        raise OpenAIError(504, f"Transcription did not finish within {limits.request_timeout} s. Send shorter "
                          "audio or raise OPEN_STT_REQUEST_TIMEOUT.", type="server_error", code="timeout",
                          headers={"x-should-retry": "false"}) from None
    except ModelFailure as exc:
        log.error("%s %s", request_id, exc)
        raise model_failure(exc, request_id, engine.name) from None
    finally:
        await _stop(run)
    _log_done(request_id, req, engine.name, transcript.duration, started)
    return render(transcript, req.response_format, task=task, granularities=req.timestamp_granularities,
                  logprobs="logprobs" in req.include, model=engine.name)


def _tracked(run: TranscriptionRun, slot: Slot) -> TranscriptionRun:
    """The same run, noting on the slot how far it got (for the line logged if its client leaves)."""

    async def segments() -> AsyncIterator[Segment]:
        async for segment in run.aiter():
            slot.progress = segment.end
            yield segment

    return dataclasses.replace(run, segments=segments())


async def _stop(run: TranscriptionRun) -> None:
    """Close a run's window loop however its consumer left it (finished, failed, cancelled), so
    that no further window is sent and nothing waits for the garbage collector."""
    aclose = getattr(run.segments, "aclose", None)  # in-process runs are plain iterators, maybe in a thread
    if aclose is not None:
        await aclose()


def _log_done(request_id: str | None, req: AudioRequest, model: str, duration: float, started: float) -> None:
    """The one info line per request. Never the transcript, the prompt or the key."""
    elapsed = time.perf_counter() - started
    extras = "".join([
        f" requested={req.model}" if req.model and req.model != model else "",
        f" language={req.language}" if req.language else "",
        f" languages={','.join(req.languages)}" if req.languages else "",
        f" keywords={len(req.keywords)}" if req.keywords else "",
        f" temperature={req.temperature}" if req.temperature else "",
        " stream" if req.stream else "",
        f" granularities={','.join(req.timestamp_granularities)}" if req.response_format == "verbose_json" else "",
        f" chunking={req.chunking_strategy}" if req.chunking_strategy else "",
    ])
    rtf = elapsed / duration if duration else 0.0
    log.info("%s %s model=%s audio=%.2fs format=%s%s took=%.2fs rtf=%.3f", request_id, req.task, model, duration,
             req.response_format, extras, elapsed, rtf,
             extra={"request_id": request_id, "task": req.task, "model": model, "audio_seconds": round(duration, 3),
                    "format": req.response_format, "stream": req.stream, "status": 200,
                    "latency_seconds": round(elapsed, 3), "rtf": round(rtf, 4)})


async def _events(run: TranscriptionRun, req: AudioRequest, model: str, request_id, started,
                  limits: Limits, slot: Slot) -> AsyncIterator[str]:
    """SSE: one ``transcript.text.delta`` per decoded segment, then ``transcript.text.done``."""
    with_logprobs = "logprobs" in req.include
    text, tokens, logprobs = "", 0, []
    deadline = time.monotonic() + limits.request_timeout
    try:
        async for segment in run.aiter():
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream exceeded {limits.request_timeout} s")
            slot.progress = segment.end
            delta = segment.text.lstrip() if not text else segment.text
            if not delta:
                continue
            text += delta
            tokens += len(segment.tokens)
            logprobs.extend(segment.logprobs)
            yield sse(delta_event(delta, segment.logprobs if with_logprobs else None))
        yield sse(done_event(text, token_usage(tokens, run.duration), logprobs if with_logprobs else None))
        _log_done(request_id, req, model, run.duration, started)
    except Exception as exc:
        # Headers are gone already: report in-band, as the SDK expects (it raises openai.APIError).
        log.exception("%s stream failed after %d characters", request_id, len(text))
        err = model_failure(exc, request_id, model) if isinstance(exc, ModelFailure) else internal_error(request_id)
        slot.fail(err.status, err.code or "internal_error")
        yield sse(error_event(err.message, code=err.code))
    finally:  # also when its client left (SlotStreamingResponse cancels or closes this generator)
        await _stop(run)


def _audio_openapi(task: str) -> dict:
    """The multipart form in the OpenAPI document (the route parses it by hand; see forms.py)."""
    props: dict = {
        "file": {"type": "string", "format": "binary"},
        "model": {"type": "string", "example": "whisper-1",
                  "description": "Optional: without it the server's default model answers."},
        "keywords[]": {"type": "array", "items": {"type": "string", "maxLength": 100}, "maxItems": 50},
        "prompt": {"type": "string"},
        "response_format": {"type": "string", "enum": ["json", "text", "srt", "verbose_json", "vtt"]},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
    }
    if task == "transcribe":
        props.update({
            "language": {"type": "string", "example": "en"},
            "languages[]": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "timestamp_granularities[]": {"type": "array", "items": {"type": "string", "enum": ["word", "segment"]}},
            "include[]": {"type": "array", "items": {"type": "string", "enum": ["logprobs"]}},
            "stream": {"type": "boolean"},
        })
    error = {"description": "OpenAI error envelope", "content": {"application/json": {"schema": {
        "type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": [
            "message", "type", "param", "code"]}}}}}}
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"], "properties": props}}}},
        "responses": {"200": {"description": "Transcript (json, text/plain formats, or text/event-stream)"},
                      **{code: error for code in ("400", "401", "404", "413", "429", "503", "504")}},
    }


@router.post("/v1/audio/transcriptions", openapi_extra=_audio_openapi("transcribe"))
async def transcriptions(request: Request) -> Response:
    return await _transcribe(request, "transcribe")


@router.post("/v1/audio/translations", openapi_extra=_audio_openapi("translate"))
async def translations(request: Request) -> Response:
    return await _transcribe(request, "translate")
