"""Rendering a transcript in the ``response_format`` the client asked for (OpenAI's exact shapes)."""

from __future__ import annotations

import json
import math

from fastapi.responses import JSONResponse, PlainTextResponse, Response

from openstt.transcript import Segment, TokenLogprob, Transcript
from openstt.languages import LANGUAGE_NAMES

TEXT_MEDIA_TYPE = "text/plain; charset=utf-8"


def usage(duration: float) -> dict:
    """OpenAI's duration-form usage, billed like whisper-1 in whole seconds (rounded up)."""
    return {"type": "duration", "seconds": math.ceil(round(duration, 3))}


def token_usage(transcript_tokens: int, audio_seconds: float, prompt_tokens: int = 0) -> dict:
    """The tokens form (streaming's done event). Audio tokens: Whisper's encoder emits 50 per second."""
    audio_tokens = math.ceil(audio_seconds * 50)
    return {"type": "tokens", "input_tokens": audio_tokens + prompt_tokens,
            "input_token_details": {"text_tokens": prompt_tokens, "audio_tokens": audio_tokens},
            "output_tokens": transcript_tokens, "total_tokens": audio_tokens + prompt_tokens + transcript_tokens}


def _timestamp(seconds: float, separator: str) -> str:
    ms = round(max(seconds, 0.0) * 1000)  # round once, then split: 59.9996 s is 00:01:00.000
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def _cue_text(segment: Segment) -> str:
    # Cue text must not contain "-->" or blank lines, which would end or break the cue.
    return " ".join(segment.text.strip().replace("-->", "->").split())


def _cues(segments: list[Segment]) -> list[tuple[Segment, str]]:
    # a cue without text would leave a blank line where its text belongs, ending it early
    return [(s, text) for s in segments if (text := _cue_text(s))]


def to_srt(segments: list[Segment]) -> str:
    """SubRip cues; a diarized segment's text starts with its speaker (``A: ...``)."""
    return "".join(
        f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n"
        f"{f'{s.speaker}: ' if s.speaker else ''}{text}\n\n"
        for i, (s, text) in enumerate(_cues(segments), start=1)
    )


def _voice(speaker: str) -> str:
    # a voice annotation ends at ">" and must not hold a line break (WebVTT 5.4)
    return " ".join(speaker.replace(">", "").replace("&", "&amp;").replace("<", "&lt;").split())


def _vtt_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;")


def to_vtt(segments: list[Segment]) -> str:
    """WebVTT cues; a diarized segment is a voice span (``<v A>...``)."""
    cues = "".join(f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n"
                   f"{f'<v {_voice(s.speaker)}>' + _vtt_text(text) if s.speaker else text}\n\n"
                   for s, text in _cues(segments))
    return "WEBVTT\n\n" + cues


def _logprobs(entries: list[TokenLogprob]) -> list[dict]:
    return [{"token": e.token, "logprob": e.logprob, "bytes": e.bytes} for e in entries]


def segment_dict(s: Segment) -> dict:
    body = {"id": s.id, "seek": s.seek, "start": s.start, "end": s.end, "text": s.text, "tokens": s.tokens,
            "temperature": s.temperature, "avg_logprob": s.avg_logprob, "compression_ratio": s.compression_ratio,
            "no_speech_prob": s.no_speech_prob}
    if s.speaker is not None:  # diarize=true (beyond OpenAI's schema; the SDK keeps extra fields)
        body["speaker"] = s.speaker
    return body


def diarized_segment(s: Segment) -> dict:
    """A segment of ``diarized_json``, also the ``transcript.text.segment`` stream event."""
    return {"type": "transcript.text.segment", "id": f"seg_{s.id + 1:03d}", "start": s.start, "end": s.end,
            "text": s.text.strip(), "speaker": s.speaker or "A"}


def speaker_lines(segments: list[Segment]) -> str:
    """The transcript as ``Speaker: text`` lines, one per change of speaker (OpenAI's example)."""
    lines: list[list] = []
    for s in segments:
        text = s.text.strip()
        if not text:
            continue
        if lines and lines[-1][0] == s.speaker:
            lines[-1][1].append(text)
        else:
            lines.append([s.speaker, [text]])
    return "\n".join(f"{speaker or 'A'}: {' '.join(texts)}" for speaker, texts in lines)


def to_diarized_json(transcript: Transcript) -> dict:
    return {"task": "transcribe", "duration": transcript.duration, "text": speaker_lines(transcript.segments),
            "segments": [diarized_segment(s) for s in transcript.segments if s.text.strip()],
            "usage": usage(transcript.duration)}


def _word(w) -> dict:
    body = {"word": w.word, "start": w.start, "end": w.end}
    if w.speaker is not None:  # diarize=true, like a segment's speaker
        body["speaker"] = w.speaker
    return body


def to_verbose_json(transcript: Transcript, *, task: str, granularities: list[str], model: str | None = None) -> dict:
    body: dict = {
        "task": task,
        # translations always report the output language
        "language": "english" if task == "translate" else LANGUAGE_NAMES.get(transcript.language, transcript.language),
        "duration": transcript.duration,
        "text": transcript.text,
    }
    if "segment" in granularities or task == "translate":
        body["segments"] = [segment_dict(s) for s in transcript.segments]
    if "word" in granularities and task == "transcribe":
        body["words"] = [_word(w) for w in transcript.words]
    if task == "transcribe":
        body["usage"] = usage(transcript.duration)
    if model:  # beyond OpenAI's schema (the SDK keeps extra fields): the model that answered, never an alias
        body["model"] = model
    return body


def render(transcript: Transcript, response_format: str, *, task: str = "transcribe",
           granularities: list[str] = ("segment",), logprobs: bool = False, model: str | None = None) -> Response:
    if response_format == "text":
        # Raw body with one trailing newline, as OpenAI sends it; the SDK returns it verbatim.
        return PlainTextResponse(transcript.text + "\n", media_type=TEXT_MEDIA_TYPE)
    if response_format == "srt":
        return PlainTextResponse(to_srt(transcript.segments), media_type=TEXT_MEDIA_TYPE)
    if response_format == "vtt":
        return PlainTextResponse(to_vtt(transcript.segments), media_type=TEXT_MEDIA_TYPE)
    if response_format == "verbose_json":
        return JSONResponse(to_verbose_json(transcript, task=task, granularities=list(granularities), model=model))
    if response_format == "diarized_json":
        return JSONResponse(to_diarized_json(transcript))
    if response_format == "json":
        body: dict = {"text": transcript.text}
        if logprobs:
            body["logprobs"] = _logprobs([e for s in transcript.segments for e in s.logprobs])
        if task == "transcribe":  # the translation schema has no usage
            body["usage"] = usage(transcript.duration)
        return JSONResponse(body)
    raise ValueError(f"unsupported response_format {response_format!r}")


def sse(event: dict) -> str:
    """One Server-Sent Events frame: ``data: <compact JSON>`` and a blank line, no event name."""
    return "data: " + json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def delta_event(text: str, logprobs: list[TokenLogprob] | None = None) -> dict:
    event: dict = {"type": "transcript.text.delta", "delta": text}
    if logprobs is not None:
        event["logprobs"] = _logprobs(logprobs)
    return event


def done_event(text: str, usage_tokens: dict, logprobs: list[TokenLogprob] | None = None) -> dict:
    event: dict = {"type": "transcript.text.done", "text": text}
    if logprobs is not None:
        event["logprobs"] = _logprobs(logprobs)
    event["usage"] = usage_tokens
    return event


def stream_error_event(message: str, *, type: str = "server_error", code: str | None = None) -> dict:
    """The in-band ``error`` event that ends a streamed (SSE) transcription; the Realtime one is
    ``live.protocol.error_event``."""
    return {"type": "error", "error": {"message": message, "type": type, "param": None, "code": code}}
