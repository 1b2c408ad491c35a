"""Rendering a transcript in the ``response_format`` the client asked for."""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse, PlainTextResponse, Response

from openstt.engines.base import Transcript

TEXT_MEDIA_TYPE = "text/plain; charset=utf-8"
# Formats this version renders; the rest of OpenAI's list is answered with a clear 400.
RENDERED_FORMATS = ("json", "text")


def usage(transcript: Transcript) -> dict:
    """OpenAI's duration-form usage, billed like whisper-1 in whole seconds (rounded up)."""
    return {"type": "duration", "seconds": math.ceil(round(transcript.duration, 3))}


def render(transcript: Transcript, response_format: str, *, task: str = "transcribe") -> Response:
    if response_format == "text":
        # Raw body with one trailing newline, as OpenAI sends it; the SDK returns it verbatim.
        return PlainTextResponse(transcript.text + "\n", media_type=TEXT_MEDIA_TYPE)
    if response_format == "json":
        body: dict = {"text": transcript.text}
        if task == "transcribe":  # the translation schema has no usage
            body["usage"] = usage(transcript)
        return JSONResponse(body)
    raise ValueError(f"unsupported response_format {response_format!r}")
