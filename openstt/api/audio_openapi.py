"""The audio routes' multipart form in the OpenAPI document: the routes parse the form by hand
(``forms.py``), so FastAPI cannot derive it."""

from __future__ import annotations

from openstt.messages import MAX_SPEAKERS


def audio_openapi(task: str) -> dict:
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
