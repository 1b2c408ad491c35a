"""Parsing the multipart form of the audio endpoints exactly as OpenAI clients send it.

The form is read by hand rather than through FastAPI ``Form()`` parameters: list fields arrive
as ``timestamp_granularities[]`` (the SDK), bare repeated keys, JSON arrays or comma lists, and
every problem must become a 400 in OpenAI's envelope, never a 422 or a 500, and name the field
(``param``) where there is one. A scalar field sent twice is refused, not "last wins": the request
is ambiguous, and no OpenAI client sends one twice.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from openstt.api.errors import bad_request
from openstt.messages import MAX_SPEAKERS
from openstt.engines.base import MAX_KEYWORD_CHARS, MAX_KEYWORDS, MAX_PROMPT_CHARS
from openstt.languages import normalize_language
from openstt.api.vad_fields import chunking_strategy_options
from openstt.vad import VadOptions

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt", "diarized_json")
INCLUDES = ("logprobs",)
GRANULARITIES = ("word", "segment")
# Starlette's default 1 MiB cap on text parts is too small for long prompts and for known speakers'
# references (10 s of 48 kHz stereo float WAV is 5 MiB as base64); files are unaffected.
MAX_TEXT_PART = 8 * 1024 * 1024
# Model names, codes, enums and numbers: HF repo ids are at most 96 characters.
MAX_FIELD_CHARS = 256
MAX_CHUNKING_CHARS = 1024  # a server_vad object of four keys is under 200 characters
# MAX_PROMPT_CHARS, MAX_KEYWORDS, MAX_KEYWORD_CHARS: what could reach the decoder's prompt (engines/base.py)
MAX_BEAM_SIZE = 10  # beam_size (our extension): 1 (greedy) .. 10
MAX_KNOWN_SPEAKERS = 4  # OpenAI's limit on known_speaker_names[] / known_speaker_references[]
MAX_SPEAKER_NAME_CHARS = 64
DIARIZE_FORMATS = ("verbose_json", "srt", "vtt")  # what diarize=true (our extension) adds speakers to


@dataclass
class AudioRequest:
    file: UploadFile
    model: str | None  # None: the default model (the original server's contract)
    task: str = "transcribe"
    response_format: str = "json"
    language: str | None = None
    languages: list[str] = field(default_factory=list)  # detection candidates (transcriptions)
    prompt: str | None = None
    keywords: list[str] = field(default_factory=list)
    temperature: float = 0.0
    beam_size: int | None = None  # None: the server's default
    stream: bool = False
    timestamp_granularities: list[str] = field(default_factory=lambda: ["segment"])
    include: list[str] = field(default_factory=list)
    chunking_strategy: dict | str | None = None  # as sent (for the request's log line)
    # ``chunking_strategy`` parsed once, here: VAD settings ("auto" or a server_vad object), "none"
    # (our extension: the sequential procedure), or None (not given: the server's ``long_form``)
    chunking: VadOptions | str | None = None
    diarize: bool = False  # our extension: speakers in verbose_json, srt and vtt
    known_speaker_names: list[str] = field(default_factory=list)
    known_speaker_references: list[bytes] = field(default_factory=list)  # decoded data URLs, paired with the names
    # speaker-count hints for the diarization (our extension, pyannote's names): exactly, at least, at most
    num_speakers: int | None = None
    min_speakers: int | None = None
    max_speakers: int | None = None

    @property
    def diarized(self) -> bool:
        """Whether the answer needs speakers."""
        return self.response_format == "diarized_json" or self.diarize


def _param(name: str) -> str:
    """The parameter a form key sets: ``timestamp_granularities[]`` and ``chunking_strategy[type]``
    are ``timestamp_granularities`` and ``chunking_strategy``."""
    return name.split("[", 1)[0][:64]


def _shown(value: str, limit: int = 40) -> str:
    """``value`` for an error message: an answer never echoes megabytes back."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


class _FieldError(MultiPartException):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class _StrictMultiPartParser(MultiPartParser):
    """Starlette's parser, strict where it is lenient: a text part over ``MAX_TEXT_PART`` or not
    valid in the declared charset (UTF-8 by default) is an error naming the field (Starlette's
    message names none, and it reads undecodable bytes as latin-1), and so is a body without its
    closing boundary (python-multipart accepts one)."""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current_part
        if part.file is None and len(part.data) + end - start > self.max_part_size:
            raise _FieldError(f"'{_param(part.field_name)}' is larger than {self.max_part_size // 2**20} MiB, "
                              "the most a text field may hold.", _param(part.field_name))
        super().on_part_data(data, start, end)

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                part.data.decode(self._charset)
            except UnicodeDecodeError:
                raise _FieldError(f"'{_param(part.field_name)}' is not valid {self._charset} text.",
                                  _param(part.field_name)) from None
        super().on_part_end()

    def on_end(self) -> None:  # python-multipart calls it on the closing boundary only
        self.ended = True

    async def parse(self) -> FormData:
        self.ended = False
        form = await super().parse()
        if not self.ended:  # a cut body: its last part would be dropped without a word
            await form.close()
            raise MultiPartException("The body ended before the form's closing boundary.")
        return form


async def read_form(request: Request) -> FormData:
    """The request's form; any problem with it (no boundary, malformed or truncated parts, a part
    without a name, a text part too large or not text) is a 400 ``invalid_form``."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise bad_request(
            "Requests to this endpoint must be multipart/form-data with the audio in a 'file' part.",
            param=None, code="invalid_content_type",
        )
    try:
        if content_type.startswith("application/x-www-form-urlencoded"):  # no file: parse_audio_form says so
            return await request.form(max_part_size=MAX_TEXT_PART)
        return await _StrictMultiPartParser(request.headers, request.stream(), max_part_size=MAX_TEXT_PART).parse()
    except _FieldError as exc:
        raise bad_request(exc.message, param=exc.param, code="invalid_form") from None
    except Exception as exc:  # python-multipart / starlette parse errors, a body that ends early
        detail = getattr(exc, "message", None) or getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        raise bad_request(f"Could not parse the multipart form: {detail}", param=None, code="invalid_form") from exc


def _one(form: FormData, name: str):
    """The one value of ``name`` (None if absent); two or more is a 400 naming it."""
    values = form.getlist(name)
    if len(values) > 1:
        raise bad_request(f"'{name}' was sent {len(values)} times; send it once.", param=_param(name))
    return values[0] if values else None


def _text(form: FormData, name: str, max_chars: int | None = MAX_FIELD_CHARS) -> str | None:
    value = _one(form, name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"'{name}' must be a text field, not a file.", param=_param(name))
    value = value.strip()
    if max_chars is not None and len(value) > max_chars:
        raise bad_request(f"'{name}' is {len(value)} characters long; at most {max_chars} are allowed.",
                          param=_param(name))
    return value or None  # the SDK sends "" for explicit empty strings: treat as absent


def _prompt(form: FormData) -> str | None:
    """``prompt``, its last ``MAX_PROMPT_CHARS`` characters: the model sees only the tail."""
    value = _text(form, "prompt", max_chars=None)
    return value[-MAX_PROMPT_CHARS:].lstrip() if value else None


def _list(form: FormData, name: str, *, split_commas: bool = True) -> list[str]:
    """A list field as the SDK sends it (``name[]`` repeated) or as other clients do (bare
    repeated ``name``, a JSON array, or a comma list unless the items are free text)."""
    raw = [v for key in (f"{name}[]", name) for v in form.getlist(key)]
    if any(not isinstance(v, str) for v in raw):
        raise bad_request(f"'{name}[]' must be text fields, not files.", param=name)
    items: list[str] = []
    for value in raw:
        value = value.strip()
        if value.startswith("["):
            try:
                parsed = json.loads(value)
            except (ValueError, RecursionError):  # also ints over 4,300 digits and deep nesting
                raise bad_request(f"'{name}' is not a valid JSON array: {_shown(value)}", param=name) from None
            if not all(isinstance(v, str) for v in parsed):
                raise bad_request(f"'{name}' must be a JSON array of strings: {_shown(value)}", param=name)
            items.extend(v.strip() for v in parsed)
        elif split_commas:
            items.extend(v.strip() for v in value.split(","))
        else:
            items.append(value)
    return [i for i in items if i]


def _language(value: str | None, param: str) -> str | None:
    try:
        return normalize_language(value)
    except ValueError:
        raise bad_request(f"Invalid language {_shown(value)}. Language parameter must be specified in ISO-639-1 "
                          "format.",
                          param=param, code="invalid_language_format") from None


def _keywords(form: FormData) -> list[str]:
    keywords = list(dict.fromkeys(_list(form, "keywords", split_commas=False)))
    if len(keywords) > MAX_KEYWORDS:
        raise bad_request(f"Too many keywords: {len(keywords)}; at most {MAX_KEYWORDS} are allowed.",
                          param="keywords")
    long = next((k for k in keywords if len(k) > MAX_KEYWORD_CHARS), None)
    if long is not None:
        raise bad_request(f"Keyword too long: {len(long)} characters; at most {MAX_KEYWORD_CHARS} are allowed.",
                          param="keywords")
    return keywords


def _beam_size(form: FormData) -> int | None:
    """``beam_size`` (our extension; the SDK sends it with ``extra_body``): beam search width at
    temperature 0, 1 (greedy) to ``MAX_BEAM_SIZE``; absent: the server's default."""
    value = _text(form, "beam_size")
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_BEAM_SIZE:
        raise bad_request(f"Invalid value for 'beam_size': expected an integer between 1 and {MAX_BEAM_SIZE}.",
                          param="beam_size")
    return int(value)


def _speaker_counts(form: FormData) -> tuple[int | None, int | None, int | None]:
    """``num_speakers``, ``min_speakers`` and ``max_speakers`` (our extension, pyannote's names; the
    SDK sends them with ``extra_body``): integers from 1 to ``MAX_SPEAKERS``, consistent."""
    counts = []
    for name in ("num_speakers", "min_speakers", "max_speakers"):
        value = _text(form, name)
        if value is not None and not (value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_SPEAKERS):
            raise bad_request(f"Invalid value for '{name}': expected an integer between 1 and {MAX_SPEAKERS}.",
                              param=name)
        counts.append(int(value) if value is not None else None)
    num, low, high = counts
    if low is not None and high is not None and low > high:
        raise bad_request(f"'min_speakers' ({low}) is more than 'max_speakers' ({high}).", param="min_speakers")
    if num is not None and not (low or 1) <= num <= (high or MAX_SPEAKERS):
        raise bad_request(f"'num_speakers' ({num}) is outside 'min_speakers'..'max_speakers' ({low or 1}.."
                          f"{high or MAX_SPEAKERS}).", param="num_speakers")
    return num, low, high


def _bool(form: FormData, name: str) -> bool:
    value = _text(form, name)
    if value is None:
        return False
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise bad_request(f"Invalid value for '{name}': expected true or false.", param=name)


def parse_audio_form(form: FormData, *, task: str) -> AudioRequest:
    """Validate the fields shared by transcriptions and translations."""
    upload = _one(form, "file")
    if upload is None:
        raise bad_request("Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
    if not isinstance(upload, UploadFile):
        raise bad_request("'file' must be a file upload (multipart part with a filename).", param="file")

    model = _text(form, "model")  # optional: absent or empty means the default model

    response_format = (_text(form, "response_format") or "json").lower()
    if response_format not in RESPONSE_FORMATS:
        supported = ", ".join(f"'{f}'" for f in RESPONSE_FORMATS)
        raise bad_request(f"Invalid value: {_shown(response_format)}. Supported values are: {supported}.",
                          param="response_format")

    temperature_raw = _text(form, "temperature")
    try:
        temperature = float(temperature_raw) if temperature_raw is not None else 0.0
    except ValueError:
        temperature = math.nan
    if not 0.0 <= temperature <= 1.0:  # also rejects NaN
        raise bad_request("Invalid value for 'temperature': expected a number between 0 and 1.", param="temperature")

    language, languages = None, []
    if task == "transcribe":
        language = _language(_text(form, "language"), "language")
        languages = list(dict.fromkeys(_language(v, "languages") for v in _list(form, "languages")))
        if language is not None and languages and language not in languages:
            raise bad_request(f"'language' ({language}) is not among 'languages[]' ({', '.join(languages)}).",
                              param="language")
        if len(languages) == 1:  # one possible language: no detection needed
            language = languages[0]
        if language is not None:
            languages = []

    granularities = _list(form, "timestamp_granularities") or ["segment"]
    bad = [g for g in granularities if g not in GRANULARITIES]
    if bad:
        raise bad_request(f"Invalid value for 'timestamp_granularities[]': {_shown(bad[0])}. Supported values are: "
                          "'word' and 'segment'.", param="timestamp_granularities")

    include = _list(form, "include")
    bad = [i for i in include if i not in INCLUDES]
    if bad:
        raise bad_request(f"Invalid value for 'include[]': {_shown(bad[0])}. Supported values are: 'logprobs'.",
                          param="include")

    diarize = _bool(form, "diarize")
    diarized = diarize or response_format == "diarized_json"
    # known speakers are diarization's (OpenAI: "diarize only"); other requests ignore them unread
    names, references = _known_speakers(form) if diarized else ([], [])
    num_speakers, min_speakers, max_speakers = _speaker_counts(form) if diarized else (None, None, None)
    if diarize and response_format not in DIARIZE_FORMATS:
        raise bad_request(f"'diarize' adds speakers to {', '.join(DIARIZE_FORMATS)}; for speakers with "
                          f"response_format '{response_format}' use 'diarized_json'.", param="diarize")
    if task == "translate" and diarized:
        raise bad_request("Translations cannot be diarized: use /v1/audio/transcriptions.",
                          param="diarize" if diarize else "response_format", code="unsupported_value")
    if response_format == "diarized_json" and "logprobs" in include:
        raise bad_request("logprobs are not available with response_format 'diarized_json'.", param="include",
                          code="unsupported_value")

    return AudioRequest(
        file=upload, model=model, task=task, response_format=response_format, language=language,
        languages=languages, prompt=_prompt(form), keywords=_keywords(form), temperature=temperature,
        beam_size=_beam_size(form),
        stream=_bool(form, "stream") if task == "transcribe" else False,
        timestamp_granularities=list(dict.fromkeys(granularities)),
        include=include, **_chunking_strategy(form), diarize=diarize,
        known_speaker_names=names, known_speaker_references=references,
        num_speakers=num_speakers, min_speakers=min_speakers, max_speakers=max_speakers,
    )


def _known_speakers(form: FormData) -> tuple[list[str], list[bytes]]:
    """``known_speaker_names[]`` and ``known_speaker_references[]``: paired, at most four, each
    reference a base64 data URL of audio (decoded and checked for length by the route)."""
    names = _list(form, "known_speaker_names", split_commas=False)
    references = [v for key in ("known_speaker_references[]", "known_speaker_references") for v in form.getlist(key)]
    if any(not isinstance(v, str) for v in references):
        raise bad_request("'known_speaker_references[]' must be text fields (data URLs), not files.",
                          param="known_speaker_references")
    references = [v.strip() for v in references]
    if len(names) > MAX_KNOWN_SPEAKERS:
        raise bad_request(f"Too many known speakers: {len(names)}; at most {MAX_KNOWN_SPEAKERS} are allowed.",
                          param="known_speaker_names")
    if len(references) > MAX_KNOWN_SPEAKERS:
        raise bad_request(f"Too many speaker references: {len(references)}; at most {MAX_KNOWN_SPEAKERS} are "
                          "allowed.", param="known_speaker_references")
    if len(names) != len(references):
        raise bad_request(f"'known_speaker_names[]' ({len(names)}) and 'known_speaker_references[]' "
                          f"({len(references)}) must pair up one to one.",
                          param="known_speaker_names" if len(names) < len(references) else "known_speaker_references")
    if len(set(names)) != len(names):
        raise bad_request("'known_speaker_names[]' must be distinct.", param="known_speaker_names")
    long = next((n for n in names if len(n) > MAX_SPEAKER_NAME_CHARS), None)
    if long is not None:
        raise bad_request(f"Speaker name too long: {len(long)} characters; at most {MAX_SPEAKER_NAME_CHARS}.",
                          param="known_speaker_names")
    return names, [_data_url(v, i) for i, v in enumerate(references)]


def _data_url(value: str, index: int) -> bytes:
    """The bytes of a ``data:<type>;base64,<data>`` URL."""
    import base64
    import binascii

    head, comma, data = value.partition(",")
    if not (head.startswith("data:") and head.endswith(";base64") and comma):
        raise bad_request(f"known_speaker_references[{index}] must be a data URL such as "
                          "'data:audio/wav;base64,...'.", param="known_speaker_references")
    media_type = head[len("data:"):-len(";base64")].lower()
    if media_type and not media_type.startswith(("audio/", "video/", "application/octet-stream")):
        raise bad_request(f"known_speaker_references[{index}] is '{media_type}', not audio.",
                          param="known_speaker_references")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"known_speaker_references[{index}] is not valid base64.",
                          param="known_speaker_references") from None


def _chunking_strategy(form: FormData) -> dict:
    """``auto``, a JSON object, or the SDK's bracketed ``chunking_strategy[type]=server_vad`` parts,
    as sent (``chunking_strategy``) and as ``VadOptions`` (``chunking``); also (our extension)
    ``none``: the sequential procedure whatever the server's default."""
    value = _text(form, "chunking_strategy", max_chars=MAX_CHUNKING_CHARS)
    if value is not None and value.startswith("{"):
        try:  # integers as floats: a 400-digit integer would overflow float() in the VAD's check
            strategy = json.loads(value, parse_int=float)
        except (ValueError, RecursionError):
            raise bad_request("'chunking_strategy' is not valid JSON.", param="chunking_strategy") from None
    elif value is not None:
        if value not in ("auto", "none"):
            raise bad_request("'chunking_strategy' must be 'auto', 'none' or a server_vad object.",
                              param="chunking_strategy")
        return {"chunking_strategy": value, "chunking": value if value == "none" else VadOptions()}
    else:
        strategy = {key[len("chunking_strategy["):-1]: _text(form, key) for key in form.keys()
                    if key.startswith("chunking_strategy[") and key.endswith("]")}
        if not strategy:
            return {}
    if not isinstance(strategy, dict) or strategy.get("type") != "server_vad":
        raise bad_request("'chunking_strategy' object must have type 'server_vad'.", param="chunking_strategy")
    try:  # numbers, in range
        return {"chunking_strategy": strategy, "chunking": chunking_strategy_options(strategy)}
    except ValueError as exc:
        raise bad_request(f"Invalid 'chunking_strategy': {exc}.", param="chunking_strategy") from None
