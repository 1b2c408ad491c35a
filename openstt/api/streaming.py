"""A transcription streamed as server-sent events (``stream=true``): OpenAI's
``transcript.text.delta``/``done`` events, with ``diarized_json`` a ``transcript.text.segment`` per
speaker turn, and an in-band ``error`` event when it fails after the headers are gone."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from openstt.api.errors import internal_error, model_failure
from openstt.api.forms import AudioRequest
from openstt.api.limits import Limits, Slot
from openstt.api.runs import deadline_error, log_done, stop_run
from openstt.diarization.attribution import Speakers, attribute
from openstt.engines.base import TranscriptionRun
from openstt.formats import delta_event, diarized_segment, done_event, sse, stream_error_event, token_usage
from openstt.messages import ModelFailure
from openstt.transcript import Segment

log = logging.getLogger("openstt.api")


async def stream_events(run: TranscriptionRun, req: AudioRequest, model: str, request_id, started,
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
        log_done(request_id, req, model, run.duration, started)
    except Exception as exc:
        # Headers are gone already: report in-band, as the SDK expects (it raises openai.APIError).
        if isinstance(exc, TimeoutError):
            log.info("%s stream stopped at its deadline after %d characters", request_id, len(text))
            err = deadline_error(limits)
        else:
            log.exception("%s stream failed after %d characters", request_id, len(text))
            err = model_failure(exc, request_id, model) if isinstance(exc, ModelFailure) else internal_error(request_id)
        slot.fail(err.status, err.code or "internal_error")
        yield sse(stream_error_event(err.message, code=err.code))
    finally:  # also when its client left (SlotStreamingResponse cancels or closes this generator)
        await stop_run(run)
