"""OpenAI's Realtime transcription protocol, the parts a transcription session uses: the session
configuration (``session.update``, and the older ``transcription_session.update``), its
validation, and the server events.

Field and event names are the official SDK's (``openai.types.realtime``, GA shapes). A session
configuration that cannot be honoured raises ``ProtocolError``, which the connection reports as an
``error`` event naming the parameter; the connection stays usable.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from openstt.engines.base import MAX_KEYWORD_CHARS, MAX_KEYWORDS, MAX_PROMPT_CHARS
from openstt.languages import normalize_language

# OpenAI's input formats: 16-bit PCM at 24 kHz, and G.711 mu-law / A-law at 8 kHz (telephony).
INPUT_FORMATS = {"audio/pcm": 24000, "audio/pcmu": 8000, "audio/pcma": 8000}
# the older (beta) names of the same formats
BETA_FORMATS = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
LOGPROBS = "item.input_audio_transcription.logprobs"


class ProtocolError(Exception):
    """A client event that cannot be honoured: reported as an ``error`` event."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_value",
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.type = message, param, code, type


@dataclass(frozen=True)
class TurnDetection:
    """``server_vad``: speech starts when Silero's probability reaches ``threshold`` and stops after
    ``silence_duration_ms`` below it; ``prefix_padding_ms`` of audio before the start is kept.
    OpenAI's defaults."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


@dataclass(frozen=True)
class Transcription:
    model: str | None = None  # None: the server's default model
    language: str | None = None
    prompt: str | None = None
    keywords: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()  # detection candidates when no language is given


@dataclass(frozen=True)
class SessionConfig:
    """A transcription session's effective configuration."""

    format: str = "audio/pcm"
    transcription: Transcription | None = field(default_factory=Transcription)  # None: transcription off
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)  # None: manual commits
    logprobs: bool = False

    @property
    def sample_rate(self) -> int:
        return INPUT_FORMATS[self.format]

    def describe(self, session_id: str) -> dict:
        """The session object of ``session.created`` / ``session.updated`` (the SDK parses it as a
        ``RealtimeTranscriptionSessionCreateRequest``)."""
        fmt: dict[str, Any] = {"type": self.format}
        if self.format == "audio/pcm":
            fmt["rate"] = 24000
        transcription = None
        if self.transcription is not None:
            transcription = {"model": self.transcription.model, "language": self.transcription.language,
                             "prompt": self.transcription.prompt}
            if self.transcription.keywords:
                transcription["keywords"] = list(self.transcription.keywords)
        turn = None
        if self.turn_detection is not None:
            turn = {"type": "server_vad", **dataclasses.asdict(self.turn_detection)}
        return {"type": "transcription", "id": session_id, "object": "realtime.transcription_session",
                "audio": {"input": {"format": fmt, "transcription": transcription, "turn_detection": turn,
                                    "noise_reduction": None}},
                "include": [LOGPROBS] if self.logprobs else []}


# --- session.update, validated with the SDK's field names ------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Format(_Strict):
    type: Literal["audio/pcm", "audio/pcmu", "audio/pcma"] = "audio/pcm"
    rate: Literal[24000] | None = None


class _Transcription(_Strict):
    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    keywords: list[Annotated[str, Field(max_length=MAX_KEYWORD_CHARS)]] | None = Field(None, max_length=MAX_KEYWORDS)
    languages: list[str] | None = Field(None, max_length=100)
    delay: str | None = None  # gpt-realtime-whisper's latency trade-off: accepted, not used


class _TurnDetection(_Strict):
    type: str
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    prefix_padding_ms: int | None = Field(None, ge=0, le=10_000)
    silence_duration_ms: int | None = Field(None, ge=0, le=10_000)
    # conversation-session fields that mean nothing without a model response: accepted, ignored
    create_response: bool | None = None
    interrupt_response: bool | None = None
    idle_timeout_ms: int | None = None
    eagerness: str | None = None


class _Input(_Strict):
    format: _Format | None = None
    transcription: _Transcription | None = None
    turn_detection: _TurnDetection | None = None
    noise_reduction: dict | None = None  # accepted; no noise reduction is applied (reported as null)


class _Audio(_Strict):
    input: _Input | None = None


class _Session(_Strict):
    type: Literal["transcription"]
    audio: _Audio | None = None
    include: list[Literal["item.input_audio_transcription.logprobs"]] | None = None


class _BetaSession(_Strict):
    """The older ``transcription_session.update`` shape."""

    input_audio_format: Literal["pcm16", "g711_ulaw", "g711_alaw"] | None = None
    input_audio_transcription: _Transcription | None = None
    turn_detection: _TurnDetection | None = None
    input_audio_noise_reduction: dict | None = None
    include: list[Literal["item.input_audio_transcription.logprobs"]] | None = None
    client_secret: dict | None = None  # sent by some beta clients: ignored
    modalities: list[str] | None = None


def _validation_error(exc: ValidationError, prefix: str) -> ProtocolError:
    err = exc.errors()[0]
    param = ".".join([prefix, *(str(p) for p in err["loc"])])
    if err["type"] == "extra_forbidden":
        return ProtocolError(f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter")
    if err["type"] == "missing":
        return ProtocolError(f"Missing required parameter: '{param}'.", param=param,
                             code="missing_required_parameter")
    return ProtocolError(f"Invalid value for '{param}': {err['msg']}.", param=param)


def _transcription(given: _Transcription, param: str) -> Transcription:
    try:
        language = normalize_language(given.language) if given.language else None
        languages = [normalize_language(v) for v in given.languages or []]
    except ValueError:
        raise ProtocolError(f"Invalid language '{given.language}'. Language parameter must be specified in "
                            "ISO-639-1 format.", param=f"{param}.language", code="invalid_language_format") from None
    if language is None and len(languages) == 1:
        language = languages[0]
    prompt = given.prompt.strip()[-MAX_PROMPT_CHARS:] if given.prompt else None  # only a tail is ever used
    return Transcription(model=given.model or None, language=language, prompt=prompt or None,
                         keywords=tuple(given.keywords or ()),
                         languages=() if language else tuple(dict.fromkeys(languages)))


def _turn_detection(given: _TurnDetection, param: str) -> TurnDetection:
    if given.type != "server_vad":
        raise ProtocolError(f"Turn detection '{given.type}' is not supported here; use 'server_vad' (Silero VAD) "
                            "or null for manual commits.", param=f"{param}.type", code="unsupported_value")
    default = TurnDetection()
    return TurnDetection(
        threshold=default.threshold if given.threshold is None else given.threshold,
        prefix_padding_ms=default.prefix_padding_ms if given.prefix_padding_ms is None else given.prefix_padding_ms,
        silence_duration_ms=(default.silence_duration_ms if given.silence_duration_ms is None
                             else given.silence_duration_ms))


def apply_update(config: SessionConfig, event: dict) -> SessionConfig:
    """``config`` with a ``session.update`` (or ``transcription_session.update``) applied: only
    the fields present change; ``null`` turns transcription or turn detection off."""
    session = event.get("session")
    if not isinstance(session, dict):
        raise ProtocolError("Missing required parameter: 'session'.", param="session",
                            code="missing_required_parameter")
    if event["type"] == "transcription_session.update":
        return _apply_beta(config, session)
    if session.get("type") != "transcription":
        raise ProtocolError("This server serves transcription sessions only: set session.type to 'transcription' "
                            "(connect with ?intent=transcription).", param="session.type",
                            code="unsupported_value")
    try:
        parsed = _Session.model_validate(session)
    except ValidationError as exc:
        raise _validation_error(exc, "session") from None
    changes: dict[str, Any] = {}
    if parsed.include is not None:
        changes["logprobs"] = LOGPROBS in parsed.include
    given = parsed.audio.input if parsed.audio and parsed.audio.input else None
    if given is not None:
        present = given.model_fields_set
        if given.format is not None:
            changes["format"] = given.format.type
        if "transcription" in present:
            changes["transcription"] = (None if given.transcription is None else
                                        _transcription(given.transcription, "session.audio.input.transcription"))
        if "turn_detection" in present:
            changes["turn_detection"] = (None if given.turn_detection is None else
                                         _turn_detection(given.turn_detection, "session.audio.input.turn_detection"))
    return dataclasses.replace(config, **changes)


def _apply_beta(config: SessionConfig, session: dict) -> SessionConfig:
    try:
        parsed = _BetaSession.model_validate(session)
    except ValidationError as exc:
        raise _validation_error(exc, "session") from None
    present = parsed.model_fields_set
    changes: dict[str, Any] = {}
    if parsed.input_audio_format is not None:
        changes["format"] = BETA_FORMATS[parsed.input_audio_format]
    if "input_audio_transcription" in present:
        changes["transcription"] = (None if parsed.input_audio_transcription is None else
                                    _transcription(parsed.input_audio_transcription,
                                                   "session.input_audio_transcription"))
    if "turn_detection" in present:
        changes["turn_detection"] = (None if parsed.turn_detection is None else
                                     _turn_detection(parsed.turn_detection, "session.turn_detection"))
    if parsed.include is not None:
        changes["logprobs"] = LOGPROBS in parsed.include
    return dataclasses.replace(config, **changes)


# --- server events -------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:22]}"


def event(type: str, **fields) -> dict:
    """A server event: its type, a fresh ``event_id`` and ``fields``."""
    return {"type": type, "event_id": new_id("event"), **fields}


def error_event(message: str, *, type: str = "invalid_request_error", code: str | None = None,
                param: str | None = None, event_id: str | None = None) -> dict:
    """OpenAI's ``error`` event; ``event_id`` is the client event it answers, when it had one."""
    return event("error", error={"type": type, "code": code, "message": message, "param": param,
                                 "event_id": event_id})
