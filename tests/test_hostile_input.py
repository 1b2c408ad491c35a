"""Hostile uploads and form values, in-process with the real tiny.en model behind the API
(``tests.inmemory``): each is a quick 4xx in OpenAI's envelope, never a 500, a crash, a file read
or a connection; and a long prompt still works, its tail kept."""

from __future__ import annotations

import io
import struct
import time

import numpy as np
import pytest
import soundfile as sf
from starlette.datastructures import FormData, UploadFile
from starlette.testclient import TestClient

from openstt.api.errors import OpenAIError
from openstt.api.forms import MAX_PROMPT_CHARS, parse_audio_form
from openstt.api.state import app_state
from tests.conftest import clip
from tests.inmemory import inmemory_app

URL = "/v1/audio/transcriptions"


@pytest.fixture(scope="module")
def client(tiny_en_engine, hf_cache):
    app = inmemory_app([tiny_en_engine], hf_cache)
    app_state(app).api_keys = []
    with TestClient(app) as c:
        yield c


def fox() -> bytes:
    return clip("en/quick_brown_fox").read_bytes()


def error_of(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def form(**fields) -> FormData:
    """A parsed form with a (not decoded) file and ``fields``; a list value repeats its key."""
    items = [("file", UploadFile(io.BytesIO(b"RIFF"), filename="a.wav"))]
    for key, value in fields.items():
        items += [(key, v) for v in (value if isinstance(value, list) else [value])]
    return FormData(items)


# --- the prompt: any length accepted, its tail kept -------------------------------------------------


def test_a_long_prompt_keeps_its_tail():
    head, tail = "HEAD " * 200, " ".join(f"term{i}" for i in range(600))  # 1,000 + 5,289 characters
    prompt = parse_audio_form(form(prompt=head + tail), task="transcribe").prompt
    assert len(prompt) <= MAX_PROMPT_CHARS and tail.endswith(prompt) and "HEAD" not in prompt
    assert parse_audio_form(form(prompt=" short one "), task="transcribe").prompt == "short one"


def test_a_5000_character_prompt_transcribes(client):
    words = "budget meeting Zurich quarterly revenue forecast Anna Bertrand lazy dog quick brown fox".split()
    prompt = " ".join(words[i % len(words)] + ("." if i % 9 == 8 else "") for i in range(700))[:5000]
    response = client.post(URL, files={"file": ("fox.wav", fox())}, data={"prompt": prompt})
    assert response.status_code == 200, response.text
    assert "fox" in response.json()["text"].lower()


# --- values that used to answer 500 -------------------------------------------------------------------


@pytest.mark.parametrize("fields, param", [
    ({"languages[]": "[" * 5000 + "]" * 5000}, "languages"),  # RecursionError in json.loads
    ({"include[]": '["logprobs", ["logprobs"]]'}, "include"),  # a nested item was str()'d
    ({"keywords[]": "[" + "9" * 5000 + "]"}, "keywords"),  # int() over 4,300 digits: ValueError
    ({"chunking_strategy": '{"type": "server_vad", "threshold": 1' + "0" * 400 + "}"}, "chunking_strategy"),
    ({"beam_size": "1" * 5000}, "beam_size"),
    ({"model": "m" * 300}, "model"),
    ({"diarize": "true", "response_format": "verbose_json", "known_speaker_names[]": "Ann",
      "known_speaker_references[]": UploadFile(io.BytesIO(b"x"), filename="ref.wav")}, "known_speaker_references"),
])
def test_hostile_values_are_400s_naming_the_field(fields, param):
    with pytest.raises(OpenAIError) as err:
        parse_audio_form(form(**fields), task="transcribe")
    assert err.value.status == 400 and err.value.param == param
    assert len(err.value.message) < 300  # no megabytes echoed back


# --- uploads that are not audio, or cost more than they say ------------------------------------------


def test_8_channels_for_2_hours_is_a_quick_400(client):
    buf = io.BytesIO()
    sf.write(buf, np.zeros((16000, 8), np.int16), 16000, format="FLAC", subtype="PCM_16")
    data = bytearray(buf.getvalue())  # one silent second whose STREAMINFO declares 7,190 s
    data[8 + 14: 8 + 18] = struct.pack(">I", 7190 * 16000)
    started = time.perf_counter()
    error = error_of(client.post(URL, files={"file": ("x.flac", bytes(data))}))
    assert error["param"] == "file" and error["code"] == "too_many_channels"
    assert time.perf_counter() - started < 2
