"""A request's transcription run as the routes use it: held to the speech, tracked on its slot,
stopped however its consumer left it, with the deadline's error and the one line logged per
request."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from openstt.api.errors import OpenAIError
from openstt.api.forms import AudioRequest
from openstt.api.limits import Limits, Slot
from openstt.engines.base import TranscriptionRun
from openstt.speech_times import hold_to_speech
from openstt.transcript import Segment

log = logging.getLogger("openstt.api")


def deadline_error(limits: Limits) -> OpenAIError:
    # Deterministic for this audio: tell the SDK not to retry it.
    return OpenAIError(504, f"Transcription did not finish within {limits.request_timeout:g} s. Send shorter audio "
                       "or raise OPEN_STT_REQUEST_TIMEOUT.", type="server_error", code="timeout",
                       headers={"x-should-retry": "false"})


def held_to_speech(run: TranscriptionRun, spans: list[tuple[float, float]]) -> TranscriptionRun:
    """The same run, its words' and segments' times held to the speech (``speech_times``) as each
    segment comes."""

    async def segments() -> AsyncIterator[Segment]:
        try:
            async for segment in run.aiter():
                yield hold_to_speech([segment], spans)[0]
        finally:  # closed early (client gone, deadline): the window loop closes now, too
            await stop_run(run)

    return dataclasses.replace(run, segments=segments())


def tracked(run: TranscriptionRun, slot: Slot) -> TranscriptionRun:
    """The same run, noting on the slot how far it got (for the line logged if its client leaves)."""

    async def segments() -> AsyncIterator[Segment]:
        async for segment in run.aiter():
            slot.progress = segment.end
            yield segment

    return dataclasses.replace(run, segments=segments())


async def stop_run(run: TranscriptionRun) -> None:
    """Close a run's window loop however its consumer left it (finished, failed, cancelled), so
    that no further window is sent and nothing waits for the garbage collector."""
    aclose = getattr(run.segments, "aclose", None)  # in-process runs are plain iterators, maybe in a thread
    if aclose is not None:
        await aclose()


def log_done(request_id: str | None, req: AudioRequest, model: str, duration: float, started: float) -> None:
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
