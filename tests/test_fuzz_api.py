"""Fuzzing the HTTP API in-process, with the real tiny.en model behind the server's API side
(``tests.inmemory``): whatever the request, the server must not answer 5xx (the SDK retries those,
so one bad request would run three times), and a 4xx is OpenAI's envelope naming the field.

Two ways: schemathesis, from the API's own OpenAPI document; and hand-made hostile values for
every form field plus malformed multipart bodies, built byte by byte (invalid UTF-8, no boundary,
truncation are beyond what an HTTP client library would send)."""

from __future__ import annotations

import numpy as np
import pytest
import schemathesis
import soundfile as sf
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from starlette.testclient import TestClient

from openstt.api.app import create_app
from openstt.api.state import app_state
from openstt.catalog import CATALOG
from openstt.engines.base import Engine, LoopState, TranscribeOptions, TranscriptionRun
from openstt.transcript import Segment
from openstt.registry import ModelRegistry
from scripts.kit.audio import wav as wav_file
from tests.conftest import clip
from tests.inmemory import inmemory_app

app = create_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
URL = "/v1/audio/transcriptions"
ENVELOPE_KEYS = {"message", "type", "param", "code"}
BOUNDARY = "fuzz-7d1c0a"

# Every form field of the transcription endpoint, as clients name it.
FIELDS = ["model", "language", "languages[]", "prompt", "keywords[]", "response_format", "temperature",
          "timestamp_granularities[]", "include[]", "stream", "chunking_strategy", "diarize", "beam_size",
          "known_speaker_names[]", "known_speaker_references[]"]
VALUES = {
    "nested-json": b"[" * 5000 + b"]" * 5000,  # json.loads raised RecursionError: a 500
    "1-MiB": b"1" * 2**20,  # digits: int() refuses more than 4,300
    "invalid-utf8": b"\xff\xfe\xc3(abc",
    "json-object": b'{"a": {"b": [1, 2.5, null]}}',
    "empty": b"",
}


@pytest.fixture(scope="module", autouse=True)
def loaded(tiny_en_engine, hf_cache):
    inmemory_app([tiny_en_engine], hf_cache, app=app)
    yield
    app_state(app).registry = None


@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error])


# --- hand-made hostile input -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(loaded):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def wav() -> bytes:
    """The first second of a real recording: every 200 below is a real (short) transcription."""
    audio, rate = sf.read(clip("en/quick_brown_fox"), dtype="float32")
    return wav_file(audio[:rate], rate)


def multipart(parts: list[tuple[str | None, bytes, str | None]], boundary: str = BOUNDARY) -> bytes:
    """A multipart/form-data body of ``(name, value, filename)`` parts, exactly these bytes
    (``name`` None: a part without one)."""
    out = b""
    for name, value, filename in parts:
        disposition = "form-data" + (f'; name="{name}"' if name is not None else "")
        disposition += f'; filename="{filename}"' if filename else ""
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        head += "Content-Type: application/octet-stream\r\n" if filename else ""
        out += head.encode() + b"\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def post(client, body: bytes, content_type: str = f"multipart/form-data; boundary={BOUNDARY}"):
    return client.post(URL, content=body, headers={"content-type": content_type})


def error_of(response, status: int | None = None) -> dict:
    """The error of a 4xx answer, checked to be OpenAI's envelope."""
    assert 400 <= response.status_code < 500 if status is None else response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ENVELOPE_KEYS, body
    return body["error"]


class Instant(Engine):
    """Answers at once: the hostile values below test the form and the route, not the decoder
    (with tiny.en, each of the ~25 valid ones was a 0.5 s transcription)."""

    supports_word_timestamps = True

    def start(self, audio, options: TranscribeOptions) -> TranscriptionRun:
        segment = Segment(0, 0, 0.0, len(audio) / 16000, " fox", [], 0.0, 0.0, 1.0, 0.0)
        return TranscriptionRun(state=LoopState("en"), duration=len(audio) / 16000, segments=iter([segment]))


@pytest.fixture(scope="module")
def instant():
    form_app = create_app()
    app_state(form_app).registry = ModelRegistry([Instant(CATALOG["whisper-tiny.en"])], "whisper-tiny.en")
    with TestClient(form_app) as c:
        yield c


@pytest.mark.parametrize("field, kind", [(f, k) for f in FIELDS for k in VALUES])
def test_hostile_field_values(instant, wav, field, kind):
    response = post(instant, multipart([("file", wav, "fox.wav"), (field, VALUES[kind], None)]))
    if response.status_code != 200:
        assert error_of(response)["param"] == field.removesuffix("[]"), response.text


# 223 tokens of "1111" or "[[[[" as the prompt (what the model keeps of these) make Whisper loop and
# go down its whole temperature fallback ladder: 8-11 s of CPU with tiny.en for a 1 s clip (35 s
# before a short window's tokens were capped by its length).
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nested-json", "1-MiB"])
def test_a_looping_prompt_is_bounded_by_the_clip(client, wav, kind):
    response = post(client, multipart([("file", wav, "fox.wav"), ("prompt", VALUES[kind], None)]))
    assert response.status_code == 200


@pytest.mark.parametrize("field, value", [("timestamp_granularities[]", b'["word", ["segment"]]'),
                                          ("languages[]", b'["en", 5]'), ("include[]", b'[{"a": 1}]'),
                                          ("keywords[]", b"[" + b"1" * 5000 + b"]")])
def test_json_arrays_hold_only_strings(client, wav, field, value):
    response = post(client, multipart([("file", wav, "fox.wav"), (field, value, None)]))
    assert error_of(response, 400)["param"] == field.removesuffix("[]")


@pytest.mark.parametrize("field", ["model", "response_format", "file"])
def test_a_field_sent_twice_is_refused(client, wav, field):
    value = (wav, "fox.wav") if field == "file" else (b"json", None)
    parts = [("file", wav, "fox.wav")] if field != "file" else []
    response = post(client, multipart(parts + [(field, *value), (field, *value)]))
    error = error_of(response, 400)
    assert error["param"] == field and "2 times" in error["message"]


def test_list_fields_repeat(client, wav):
    parts = [("file", wav, "fox.wav"), ("response_format", b"verbose_json", None),
             ("timestamp_granularities[]", b"word", None), ("timestamp_granularities[]", b"segment", None)]
    body = post(client, multipart(parts)).json()
    assert body["words"] and body["segments"]


def test_a_file_part_for_a_text_field(client, wav):
    for field in ("model", "include[]", "chunking_strategy[type]"):
        response = post(client, multipart([("file", wav, "fox.wav"), (field, b"x", "x.txt")]))
        assert error_of(response, 400)["param"] == field.split("[")[0]


def test_a_20_mib_text_field(client, wav):
    response = post(client, multipart([("file", wav, "fox.wav"), ("prompt", b"a" * 20 * 2**20, None)]))
    error = error_of(response, 400)
    assert error["param"] == "prompt" and error["code"] == "invalid_form"


@pytest.mark.parametrize("case", ["no-boundary", "wrong-boundary", "truncated", "no-name", "no-closing",
                                  "garbage", "headers-only"])
def test_malformed_multipart(client, wav, case):
    body = multipart([("file", wav, "fox.wav"), ("model", b"whisper-tiny.en", None)])
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    if case == "no-boundary":
        content_type = "multipart/form-data"
    elif case == "wrong-boundary":
        content_type = "multipart/form-data; boundary=other"
    elif case == "truncated":
        body = body[: len(body) // 2]
    elif case == "no-name":
        body = multipart([("file", wav, "fox.wav"), (None, b"x", None)])
    elif case == "no-closing":
        body = body[: body.rindex(b"--" + BOUNDARY.encode())]
    elif case == "garbage":
        body = np.random.default_rng(0).bytes(10_000)
    elif case == "headers-only":
        body = f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n".encode()
    error = error_of(post(client, body, content_type), 400)
    assert error["code"] == "invalid_form" and error["param"] is None
