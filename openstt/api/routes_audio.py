"""OpenAI's audio routes: ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``.

A request is admitted (``Limits``: a slot, or 429), its form parsed (``forms.py``), its model
leased from the registry, its audio decoded, and its transcription run in the engine (the
window loop here, the windows decoded by the model service); the answer is rendered in the
requested format, or streamed as server-sent events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import time
from collections.abc import AsyncIterator

import numpy as np
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
    BYTES_PER_SECOND,
    CLIENT_CLOSED_REQUEST,
    BudgetExhausted,
    ClientDisconnected,
    Limits,
    Slot,
    SlotStreamingResponse,
    unless_disconnected,
)
from openstt.api.state import app_state
from openstt.audio import SAMPLE_RATE, AudioError, decode_audio, probe_seconds
from openstt.diarization.attribution import Speakers, attribute
from openstt.diarization.clustering import MAX_SPEAKERS
from openstt.engines.base import TranscribeOptions, TranscriptionRun, UnsupportedRequest
from openstt.transcript import Segment, Transcript
from openstt.errors import OpenSTTError
from openstt.formats import delta_event, diarized_segment, done_event, stream_error_event, render, sse, token_usage
from openstt.metrics import metrics
from openstt.messages import DiarizeJob, ModelFailure
from openstt.registry import ModelRegistry
from openstt.speech_times import hold_to_speech, speech_spans
from openstt.vad import VadOptions, speech_probabilities

log = logging.getLogger("openstt.api")

router = APIRouter()


def _check_capabilities(req: AudioRequest, engine, diarization: bool) -> None:
    if req.diarized and not diarization:
        raise bad_request("Speaker diarization is not enabled on this server: start it with --enable-diarization "
                          "(OPEN_STT_ENABLE_DIARIZATION=true).",
                          param="response_format" if req.response_format == "diarized_json" else "diarize",
                          code="unsupported_value")
    if "logprobs" in req.include and not (req.response_format == "json" or req.stream):
        raise bad_request("logprobs are only available with response_format 'json' or with stream=true.",
                          param="include", code="unsupported_value")
    if (req.response_format == "verbose_json" and "word" in req.timestamp_granularities
            and not engine.supports_word_timestamps):
        raise bad_request(f"Model '{engine.name}' does not provide word timestamps.",
                          param="timestamp_granularities", code="unsupported_value")


def _vad(strategy: VadOptions | str | None, long_form: str) -> VadOptions | None:
    """The VAD-chunked mode's settings for this request, or None for the sequential procedure:
    ``chunking_strategy`` when given (``none``: sequential), else the server's ``long_form``."""
    if strategy is None:
        return VadOptions() if long_form == "vad" else None
    return None if strategy == "none" else strategy


def _options(req: AudioRequest, long_form: str = "sequential", beam_size: int = 1,
             word_timestamps: bool = False) -> TranscribeOptions:
    """The request's options; ``long_form`` and ``beam_size``: the server's defaults for what it
    omits; ``word_timestamps``: time the words even if the answer does not show them."""
    return TranscribeOptions(
        task=req.task, language=req.language, languages=tuple(req.languages), prompt=req.prompt,
        keywords=tuple(req.keywords), temperature=req.temperature,
        beam_size=req.beam_size if req.beam_size is not None else beam_size,
        word_timestamps=word_timestamps or (req.response_format == "verbose_json"
                                            and "word" in req.timestamp_granularities),
        token_logprobs="logprobs" in req.include, vad=_vad(req.chunking_strategy, long_form), stream=req.stream,
    )


MIN_REFERENCE_SECONDS, MAX_REFERENCE_SECONDS = 1.0, 10.0


def _references(req: AudioRequest) -> list[np.ndarray]:
    """The known speakers' reference clips, decoded (any container we read), 1 to 10 s each."""
    voices = []
    for i, data in enumerate(req.known_speaker_references):
        try:
            audio = decode_audio(io.BytesIO(data), max_duration=MAX_REFERENCE_SECONDS + 1)
        except AudioError as exc:
            raise bad_request(f"known_speaker_references[{i}] is not audio we can decode: {exc.message}",
                              param="known_speaker_references") from None
        seconds = len(audio) / SAMPLE_RATE
        if not MIN_REFERENCE_SECONDS <= seconds <= MAX_REFERENCE_SECONDS:
            raise bad_request(f"known_speaker_references[{i}] is {seconds:.1f} s long; references must be "
                              f"{MIN_REFERENCE_SECONDS:g} to {MAX_REFERENCE_SECONDS:g} s of the speaker's voice.",
                              param="known_speaker_references")
        voices.append(audio)
    return voices


def _start_diarization(request: Request, req: AudioRequest, audio: np.ndarray, references: list[np.ndarray],
                       probabilities: np.ndarray) -> asyncio.Task:
    """Who spoke when, found by the model service while the transcription runs."""
    diarize = app_state(request.app).diarize
    job = DiarizeJob(audio=audio, probabilities=probabilities, references=references,
                     names=req.known_speaker_names, num_speakers=req.num_speakers,
                     min_speakers=req.min_speakers or 1, max_speakers=req.max_speakers or MAX_SPEAKERS)

    async def speakers() -> Speakers:
        reply = await diarize(job)
        if reply.error is not None:
            raise ModelFailure(reply.error)
        return Speakers(reply.turns)

    return asyncio.create_task(speakers())


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
    _check_capabilities(req, engine, state.diarization)
    request_id = request_id_of(request)
    started = time.perf_counter()
    speakers: asyncio.Task | None = None
    try:
        # Decoding and inference run in worker threads so the event loop (and /health) stay free.
        references = await run_in_threadpool(_references, req)
        audio = await _decode(req, limits, slot)
        slot.audio_seconds = len(audio) / SAMPLE_RATE
        # Only now, with the upload read and decoded, does the request take a transcription slot.
        if not limits.try_admit(slot):
            raise _busy(slot.route, "rate_limit_exceeded", f"The server is busy ({limits.max_in_flight} "
                        "transcriptions in progress). Retry shortly.")
        # the server's default beam size is Whisper's; other families decode without beams
        beam_size = state.beam_size if engine.spec.family == "whisper" else 1
        options = _options(req, state.long_form, beam_size,
                           word_timestamps=req.diarized and engine.supports_word_timestamps)
        timed = req.diarized or options.word_timestamps or req.response_format in SEGMENT_TIMED
        if timed:
            # one VAD pass for all: the diarization's speech regions, the transcription's chunks and
            # where its words and segments may be
            probabilities = await run_in_threadpool(speech_probabilities, audio)
            options = dataclasses.replace(options, speech_probabilities=probabilities)
        if req.diarized:
            speakers = _start_diarization(request, req, audio, references, probabilities)
            slot.on_release(speakers.cancel)
        run = await run_in_threadpool(engine.start, audio, options)
        if timed:
            run = _held_to_speech(run, speech_spans(probabilities, len(audio)))
    except (AudioError, UnsupportedRequest) as exc:
        raise _client_error(exc) from None
    finally:
        await req.file.close()

    if req.stream:
        events = _events(run, req, engine.name, request_id, started, limits, slot, speakers)
        return SlotStreamingResponse(events, slot=slot, media_type="text/event-stream",
                                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        collect = asyncio.wait_for(_collect(run, slot, speakers), timeout=limits.request_timeout)
        # The form has been read, so the next message from the client can only be its disconnect.
        transcript = await unless_disconnected(collect, request.receive)
    except asyncio.TimeoutError:
        raise _deadline(limits) from None
    except ModelFailure as exc:
        log.error("%s %s", request_id, exc)
        raise model_failure(exc, request_id, engine.name) from None
    finally:
        await _stop(run)
    _log_done(request_id, req, engine.name, transcript.duration, started)
    return render(transcript, req.response_format, task=task, granularities=req.timestamp_granularities,
                  logprobs="logprobs" in req.include, model=engine.name)


# Formats that show segment times. Whisper's timestamp tokens can be far off (on a real phone
# call whisper-base stamped 30 s of speech 0-20 s; a 7 s silent lead-in gave a segment 0.00-9.68 s),
# so their segments are held to the speech. That costs one VAD pass: 0.37 s for 5 minutes, 4 % of
# tiny.en's sequential transcription (VAD mode shares the pass it makes anyway).
# Word times fix more (segments span their words) but add 16-27 %: they stay a request's choice.
SEGMENT_TIMED = frozenset({"verbose_json", "srt", "vtt"})


def _deadline(limits: Limits) -> OpenAIError:
    # Deterministic for this audio: tell the SDK not to retry it.
    return OpenAIError(504, f"Transcription did not finish within {limits.request_timeout:g} s. Send shorter audio "
                       "or raise OPEN_STT_REQUEST_TIMEOUT.", type="server_error", code="timeout",
                       headers={"x-should-retry": "false"})


async def _collect(run: TranscriptionRun, slot: Slot, speakers: asyncio.Task | None) -> Transcript:
    """The whole transcript; with ``speakers`` (diarization running alongside), each segment
    attributed to its speaker and split where the speaker changes."""
    transcript = await _tracked(run, slot).acollect()
    if speakers is not None:
        transcript.segments = attribute(transcript.segments, await speakers)
    return transcript


def _held_to_speech(run: TranscriptionRun, spans: list[tuple[float, float]]) -> TranscriptionRun:
    """The same run, its words' and segments' times held to the speech (``speech_times``) as each
    segment comes."""

    async def segments() -> AsyncIterator[Segment]:
        try:
            async for segment in run.aiter():
                yield hold_to_speech([segment], spans)[0]
        finally:  # closed early (client gone, deadline): the window loop closes now, too
            await _stop(run)

    return dataclasses.replace(run, segments=segments())


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
        f" chunking={'none' if req.chunking_strategy == 'none' else 'vad'}" if req.chunking_strategy else "",
    ])
    rtf = elapsed / duration if duration else 0.0
    log.info("%s %s model=%s audio=%.2fs format=%s%s took=%.2fs rtf=%.3f", request_id, req.task, model, duration,
             req.response_format, extras, elapsed, rtf,
             extra={"request_id": request_id, "task": req.task, "model": model, "audio_seconds": round(duration, 3),
                    "format": req.response_format, "stream": req.stream, "status": 200,
                    "latency_seconds": round(elapsed, 3), "rtf": round(rtf, 4)})


async def _events(run: TranscriptionRun, req: AudioRequest, model: str, request_id, started,
                  limits: Limits, slot: Slot, speakers: asyncio.Task | None = None) -> AsyncIterator[str]:
    """SSE: one ``transcript.text.delta`` per decoded segment, then ``transcript.text.done``. With
    ``diarized_json``, also a ``transcript.text.segment`` per segment (with its speaker) as soon as
    both its text and the speakers are known."""
    with_logprobs = "logprobs" in req.include
    text, tokens, logprobs = "", 0, []
    deadline = time.monotonic() + limits.request_timeout
    segment_events = speakers is not None and req.response_format == "diarized_json"
    pending: list[Segment] = []
    emitted = 0

    def flush(who: Speakers) -> list[str]:
        nonlocal emitted
        pieces = attribute(pending, who, first_id=emitted)
        pending.clear()
        emitted += len(pieces)
        return [sse(diarized_segment(p)) for p in pieces if p.text.strip()]

    segments = run.aiter()
    try:
        while True:
            try:  # every step waits at most until the request's deadline (TimeoutError, answered below)
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                    segment = await anext(segments)
            except StopAsyncIteration:
                break
            slot.progress = segment.end
            delta = segment.text.lstrip() if not text else segment.text
            if segment_events:
                pending.append(segment)
            if delta:
                text += delta
                tokens += len(segment.tokens)
                logprobs.extend(segment.logprobs)
                yield sse(delta_event(delta, segment.logprobs if with_logprobs else None))
            if segment_events and speakers.done():
                for event in flush(speakers.result()):
                    yield event
        if segment_events:
            remaining = deadline - time.monotonic()
            for event in flush(await asyncio.wait_for(asyncio.shield(speakers), timeout=max(remaining, 0.001))):
                yield event
        yield sse(done_event(text, token_usage(tokens, run.duration), logprobs if with_logprobs else None))
        _log_done(request_id, req, model, run.duration, started)
    except Exception as exc:
        # Headers are gone already: report in-band, as the SDK expects (it raises openai.APIError).
        if isinstance(exc, TimeoutError):
            log.info("%s stream stopped at its deadline after %d characters", request_id, len(text))
            err = _deadline(limits)
        else:
            log.exception("%s stream failed after %d characters", request_id, len(text))
            err = model_failure(exc, request_id, model) if isinstance(exc, ModelFailure) else internal_error(request_id)
        slot.fail(err.status, err.code or "internal_error")
        yield sse(stream_error_event(err.message, code=err.code))
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
        "response_format": {"type": "string", "enum": ["json", "text", "srt", "verbose_json", "vtt"]
                            + (["diarized_json"] if task == "transcribe" else [])},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
    }
    if task == "transcribe":
        props.update({
            "language": {"type": "string", "example": "en"},
            "languages[]": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "timestamp_granularities[]": {"type": "array", "items": {"type": "string", "enum": ["word", "segment"]}},
            "include[]": {"type": "array", "items": {"type": "string", "enum": ["logprobs"]}},
            "stream": {"type": "boolean"},
            "known_speaker_names[]": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            "known_speaker_references[]": {"type": "array", "items": {"type": "string"}, "maxItems": 4,
                                           "description": "data URLs of 1-10 s of each known speaker's voice"},
            "diarize": {"type": "boolean", "description": "Extension: speakers in verbose_json, srt and vtt "
                                                          "(needs --enable-diarization)."},
            **{name: {"type": "integer", "minimum": 1, "maximum": MAX_SPEAKERS, "description": f"Extension: {what}."}
               for name, what in (("num_speakers", "the number of speakers, when known"),
                                  ("min_speakers", "at least this many speakers"),
                                  ("max_speakers", "at most this many speakers"))},
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
